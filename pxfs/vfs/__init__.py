"""Open files, write-back buffer and read assembly of one mount: ``pxfs.vfs.vfs.Vfs``."""
