@0xcbf55fc46e2f74fd;
# pxfs wire protocol, version 2.
#
# Every node serves one TCP port, mutual TLS only, whose bootstrap capability is a Gateway. Its
# hello hands out a Session bound to the identity in the peer's certificate; each capability and
# each method checks that identity's role (pxfs/rpc/auth.py). Errors travel as Cap'n Proto exceptions whose description starts
# with "pxfs-error:<code>:<errno>:" (see pxfs/rpc/errors.py).

const protocolVersion :UInt16 = 2;

struct Label {
  key @0 :Text;
  value @1 :Text;
}

struct PoolInfo {
  node @0 :Text;
  path @1 :Text;
  class @2 :Text;
  capacity @3 :UInt64;
  used @4 :UInt64;
  free @5 :UInt64;
  chunks @6 :UInt64;
}

struct NodeInfo {
  id @0 :Text;
  address @1 :Text;
  labels @2 :List(Label);
  state @3 :Text;            # "up" / "down", judged by the control store from heartbeats
  pools @4 :List(PoolInfo);
  lastSeenMs @5 :UInt64;     # milliseconds since the control store last heard from the node
  seed @6 :Bool;
  http @7 :Text;             # HOST:PORT of its /metrics, /api/status and cluster page
}

struct VolumeInfo {
  name @0 :Text;
  size @1 :UInt64;
  used @2 :UInt64;
  repl @3 :UInt8;
  blockSize @4 :UInt32;
  labels @5 :List(Label);
  state @6 :Text;            # "healthy" / "degraded"
  replicas @7 :List(Text);   # node ids; the coordinator is one of them
  coordinator @8 :Text;
  epoch @9 :UInt64;
  createdNs @10 :UInt64;
  mounts @11 :UInt32;
  detail @12 :Text;          # JSON: lagging followers, missing chunks per replica, repair progress
  source @13 :Text;          # "VOLUME@SNAPSHOT" for a clone
  inSync @14 :List(Text);    # replicas known to hold every acknowledged batch and chunk
  minReplicas @15 :UInt8;    # acknowledgements wait while fewer in-sync replicas remain
  uid @16 :Text;             # unique per volume ever created (tombstones name it)
  waiting @17 :Text;         # why no coordinator serves the volume ("" when one does)
  cloneDone @18 :Bool;       # a clone whose coordinator copied its source snapshot in
  maxInodes @19 :UInt64;     # --max-inodes; 0: one inode per 4 KiB of the size
}

struct SnapshotInfo {
  name @0 :Text;
  createdNs @1 :UInt64;
}

struct KeyValue {
  key @0 :Data;
  value @1 :Data;
}

struct Attr {
  ino @0 :UInt64;
  mode @1 :UInt32;
  nlink @2 :UInt32;
  uid @3 :UInt32;
  gid @4 :UInt32;
  rdev @5 :UInt64;
  size @6 :UInt64;
  atimeNs @7 :Int64;
  mtimeNs @8 :Int64;
  ctimeNs @9 :Int64;
}

struct DirEntry {
  name @0 :Data;
  attr @1 :Attr;
}

# One slice of a block (pxfs.meta.slices): a block map lists a block's slices in order, later over
# earlier, as consecutive refs of one index; a block of one ref at offset 0 is one chunk.
struct BlockRef {
  index @0 :UInt64;
  hash @1 :Data;             # BLAKE3-256 of the chunk
  length @2 :UInt32;         # bytes of the chunk that belong to the block (at offset); elsewhere zeros
  offset @3 :UInt32;         # where in the block the slice starts
  append @4 :Bool;           # commit only: over the block's slices (all refs of an index agree);
                             # false: they replace them (length 0: a hole)
}

# Bootstrap of every node, reached only over mutual TLS: the peer's identity and role come from its
# certificate (pxfs.rpc.pki), never from the wire. Called by: every peer (CLI, mounts, other nodes).
interface Gateway {
  # peer: a label for the node's logs ("cli", "scrub"); it grants nothing.
  hello @0 (peer :Text) -> (session :Session, clusterId :Text, nodeId :Text, version :UInt16);
}

# What a peer holds, by role (pxfs.rpc.auth). Called by: CLI, mounts, nodes.
interface Session {
  admin @0 () -> (admin :Admin);
  chunks @1 () -> (chunks :ChunkStore);
  control @2 () -> (control :ControlStore);
  volumes @3 () -> (volumes :VolumeService);
}

# Cluster administration. Called by: the pxfs CLI (any node answers; non-seed nodes use the seed's
# ControlStore underneath).
interface Admin {
  clusterInfo @0 () -> (id :Text, name :Text, seed :Text, store :Text);
  listNodes @1 () -> (nodes :List(NodeInfo));
  # maxInodes 0: the default for the size (one inode per 4 KiB).
  createVolume @2 (name :Text, size :UInt64, repl :UInt8, blockSize :UInt32, labels :List(Label),
                   minReplicas :UInt8, maxInodes :UInt64)
      -> (volume :VolumeInfo);
  listVolumes @3 () -> (volumes :List(VolumeInfo));
  # replicas: also ask each replica's node for its copy's metadata on disk (detail.replica_meta).
  getVolume @4 (name :Text, replicas :Bool) -> (volume :VolumeInfo);
  # size 0 keeps the size, maxInodes 0 the inode limit; neither may go below what is in use.
  resizeVolume @5 (name :Text, size :UInt64, maxInodes :UInt64) -> (volume :VolumeInfo);
  deleteVolume @6 (name :Text, force :Bool) -> ();
  # Replication factor of a live volume: replicas are added (placement rules hold) or dropped.
  haUpdate @7 (name :Text, repl :UInt8) -> (volume :VolumeInfo);
  # Take a node out for good: its replicas are re-created elsewhere.
  removeNode @8 (id :Text, force :Bool) -> ();
  # Ask the coordinator for a full chunk check and repair now.
  # requested: the time stamp of this request; a round that covers it reports it as repair.asked.
  repairVolume @9 (name :Text) -> (requested :Float64);
  cloneVolume @10 (source :Text, name :Text) -> (volume :VolumeInfo);
  scheduleSnapshots @11 (name :Text, everySeconds :UInt32, keep :UInt32) -> ();
  # The explicit way out when no in-sync replica returns: node becomes coordinator and the only
  # in-sync replica under a new epoch; acknowledged writes only the others held are given up.
  promoteVolume @12 (name :Text, node :Text) -> (volume :VolumeInfo);
  # JSON: the identity, volumes nodes hold that the store has no record of, and what to do.
  storeCheck @13 () -> (report :Text);
  # Rebuild missing volume records from the nodes' local replicas; new identity generation. JSON.
  recover @14 () -> (report :Text);
  # Refuse a credential (by its certificate's serial, hex) on every node from now on.
  revokeCredential @15 (serial :Text, name :Text) -> ();
  # Every revoked credential: JSON [{serial, name, at}].
  revokedCredentials @16 () -> (report :Text);
}

# Content-addressed chunks of one node's pools. Called by: mounts (data path), other nodes (repair).
interface ChunkStore {
  put @0 (hash :Data, data :Data) -> (stored :Bool);   # stored=false: it was already there
  get @1 (hash :Data) -> (data :Data);                  # verified against hash before it is sent
  has @2 (hashes :List(Data)) -> (present :List(Bool));
  stats @3 () -> (pools :List(PoolInfo));
  # Scrub: re-read and re-hash; 0 good, 1 missing, 2 corrupt (the bad copy is quarantined).
  verify @4 (hashes :List(Data)) -> (status :List(UInt8));
  list @5 (after :Data, limit :UInt32) -> (hashes :List(Data));
  # Garbage collection of this node's pools (mark via the coordinators, sweep past the grace period).
  collect @6 (dryRun :Bool, graceSeconds :Float64) -> (report :Text);
}

# The cluster map's key-value store (embedded backend, served by the seed node). Called by: nodes.
interface ControlStore {
  get @0 (key :Text) -> (value :Data, found :Bool);
  put @1 (key :Text, value :Data) -> ();
  delete @2 (key :Text) -> (deleted :Bool);
  range @3 (prefix :Text) -> (items :List(KeyValue));
  # Compare-and-swap: writes value if the current value equals expected (found=false: key absent).
  cas @4 (key :Text, expected :Data, expectFound :Bool, value :Data) -> (ok :Bool);
  heartbeat @5 (node :NodeInfo) -> ();
  liveness @6 () -> (nodes :List(NodeInfo));
}

# Volume metadata at a node. Called by: mounts (open), coordinators (replication to followers).
# A mount's callback: names and attributes another mount changed, for the kernel to forget, so
# mounts can let the kernel cache them for long (coherent without a short TTL).
struct EntryRef {
  parent @0 :UInt64;
  name @1 :Data;
}

interface Watcher {
  invalidate @0 (inodes :List(UInt64), entries :List(EntryRef)) -> ();
}

interface VolumeService {
  # handles: the mount's open handles (one entry per handle), counted anew at this coordinator;
  # a new coordinator frees orphans only once every mount registered before it has opened here.
  # http: HOST:PORT of the mount's /metrics ("" when it serves none), kept with its registration.
  open @0 (name :Text, mountId :Text, readOnly :Bool, watcher :Watcher, handles :List(UInt64), http :Text)
      -> (volume :Volume, info :VolumeInfo);
  # A coordinator ships batches to a follower; refused when epoch is older than the follower's.
  apply @1 (name :Text, epoch :UInt64, seq :UInt64, batch :Data) -> (seq :UInt64);
  lastSeq @2 (name :Text) -> (seq :UInt64, epoch :UInt64, lastHash :Data);
  # Wipe a follower's copy (it diverged, e.g. a deposed coordinator) so the coordinator can resend it all.
  reset @3 (name :Text, epoch :UInt64) -> ();
  # Batches first, first+1, ... in one call: catching up costs one round trip per many batches.
  # trimmed: the coordinator's log holds nothing up to it; the follower drops those entries too.
  # No batches: only the trim point.
  applyMany @4 (name :Text, epoch :UInt64, first :UInt64, batches :List(Data), trimmed :UInt64)
      -> (seq :UInt64);
  # JSON {generation, replicas: [{spec, seq, epoch, last_hash, meta_bytes}]}: the copies on this
  # node's disk (meta_bytes: the size of the keyspace's files).
  localReplicas @5 () -> (replicas :Text);
  # A full copy, after a reset, for a follower behind the coordinator's trimmed log: parts of the
  # keyspace of a snapshot (all of them first) or of the volume (snapshot ""); a part with seq > 0
  # ends that keyspace, which stands at batch seq, whose log entry is lastBatch.
  load @6 (name :Text, epoch :UInt64, snapshot :Text, items :List(KeyValue), seq :UInt64, lastBatch :Data)
      -> ();
}

# One volume's POSIX metadata, served by its coordinator to a mount. Names are raw bytes.
# opId (every mutation): 8 bytes the mount picks per session + an 8-byte big-endian counter, the
# same on a retry. The coordinator records it with the result in the mutation's batch, and a call
# whose opId is recorded gets the recorded result and changes nothing. Empty: not idempotent.
interface Volume {
  getattr @0 (ino :UInt64) -> (attr :Attr);
  lookup @1 (parent :UInt64, name :Data) -> (attr :Attr);
  mknod @2 (parent :UInt64, name :Data, mode :UInt32, rdev :UInt64, uid :UInt32, gid :UInt32, opId :Data)
      -> (attr :Attr);
  mkdir @3 (parent :UInt64, name :Data, mode :UInt32, uid :UInt32, gid :UInt32, opId :Data) -> (attr :Attr);
  symlink @4 (parent :UInt64, name :Data, target :Data, uid :UInt32, gid :UInt32, opId :Data) -> (attr :Attr);
  readlink @5 (ino :UInt64) -> (target :Data);
  link @6 (ino :UInt64, newParent :UInt64, newName :Data, opId :Data) -> (attr :Attr);
  unlink @7 (parent :UInt64, name :Data, opId :Data) -> ();
  rmdir @8 (parent :UInt64, name :Data, opId :Data) -> ();
  rename @9 (parent :UInt64, name :Data, newParent :UInt64, newName :Data, flags :UInt32, opId :Data) -> ();
  # Fields with their set* flag false are left unchanged.
  setattr @10 (ino :UInt64, attr :Attr, setMode :Bool, setUid :Bool, setGid :Bool, setSize :Bool,
               setAtime :Bool, setMtime :Bool, setCtime :Bool, opId :Data) -> (attr :Attr);
  readdir @11 (ino :UInt64, after :Data, limit :UInt32) -> (entries :List(DirEntry));
  setxattr @12 (ino :UInt64, name :Data, value :Data, flags :UInt32, opId :Data) -> ();
  getxattr @13 (ino :UInt64, name :Data) -> (value :Data);
  listxattr @14 (ino :UInt64) -> (names :List(Data));
  removexattr @15 (ino :UInt64, name :Data, opId :Data) -> ();
  # The block map's first page (up to 16384 entries); more: the rest comes from blocks().
  open @16 (ino :UInt64) -> (attr :Attr, blocks :List(BlockRef), more :Bool);
  release @17 (ino :UInt64) -> ();
  # held: the replicas that answered "stored" for every chunk of blocks. The coordinator copies what
  # an in-sync replica lacks, or takes it out of the in-sync set, before it acknowledges.
  # putAgeMs: how long ago the mount began putting the chunks; past the cluster's commit window the
  # commit is refused (puts-expired): garbage collection may be about to take them (pxfs.cluster.gc).
  commit @18 (ino :UInt64, blocks :List(BlockRef), size :UInt64, mtimeNs :Int64, held :List(Text),
              opId :Data, putAgeMs :UInt32) -> (attr :Attr);
  # used: bytes of file data; metaBytes: of names, xattrs and symlink targets (both count against
  # capacity); maxInodes: the inode limit, 0 for none.
  statfs @19 () -> (capacity :UInt64, used :UInt64, inodes :UInt64, blockSize :UInt32,
                    maxInodes :UInt64, metaBytes :UInt64);
  info @20 () -> (info :VolumeInfo);
  # Every chunk the volume's block maps name (scrub), and where given chunks are used (its report).
  # chunkRefs pages them in hash order: those after `after` ("" from the start), at most limit
  # (and 65536); more: there is a next page.
  chunkRefs @21 (after :Data, limit :UInt32) -> (hashes :List(Data), more :Bool);
  # locate pages the places in (path, offset) order: those after (afterPath, afterOffset)
  # (afterPath "" from the start), at most limit (and 16384, and about 1 MiB); more: there is a
  # next page. At most 65536 hashes per call.
  locate @22 (hashes :List(Data), afterPath :Data, afterOffset :UInt64, limit :UInt32)
      -> (places :List(ChunkPlace), more :Bool);
  # The mount is going away: stop counting it as a mount of the volume.
  detach @23 () -> ();
  # Check the metadata (and with repair=true fix what is safe, as one batch); the report is JSON.
  fsck @24 (repair :Bool) -> (report :Text);
  # Snapshots: a replicated batch; every replica checkpoints its keyspace when it commits it.
  snapshotCreate @25 (name :Text) -> ();
  snapshotDelete @26 (name :Text) -> ();
  snapshotList @27 () -> (snapshots :List(SnapshotInfo));
  restore @28 (name :Text) -> ();
  # create = mknod of a regular file + open of it, in one round trip (the common open(O_CREAT)).
  create @29 (parent :UInt64, name :Data, mode :UInt32, uid :UInt32, gid :UInt32, opId :Data) -> (attr :Attr);
  # Closes sent in the background, many at once: close(2) does not wait for the coordinator.
  releaseMany @30 (inos :List(UInt64)) -> ();
  # A page of the block map: entries from index start on, at most limit (and 16384) of them;
  # more: there is a next page. A block map of any size is read in bounded messages.
  blocks @31 (ino :UInt64, start :UInt64, limit :UInt32) -> (blocks :List(BlockRef), more :Bool);
}

struct ChunkPlace {
  hash @0 :Data;
  path @1 :Data;             # from the volume root; an unlinked-but-open file has "<orphan ino N>"
  offset @2 :UInt64;
  length @3 :UInt32;
}
