"""The Docker/podman volume plugin (``pxfs volume-plugin``): the volume plugin protocol (HTTP POST
of JSON on a unix socket) translated to ``pxfs.client``."""
