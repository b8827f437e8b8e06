#!/usr/bin/env python3
"""Assemble a single-layer OCI image archive from files on this machine, without a registry or a
container engine, for `ctr images import`.

    oci-archive.py --name localhost/headroom:test --out headroom.tar \
        --file /path/to/headroom:/usr/bin/headroom --libs-of /usr/bin/headroom \
        --entrypoint /usr/bin/headroom

The archive is reproducible: the same inputs give the same bytes (fixed times, sorted entries).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"


def fail(msg):
    print(f"oci-archive: {msg}", file=sys.stderr)
    sys.exit(2)


def shared_libraries(binary):
    """The libraries `binary` loads, as (host path, path in the image); empty for a static one."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        fail("ldd is not installed (needed for --libs-of)")
    if "not a dynamic executable" in out.stdout + out.stderr or "statically linked" in out.stdout:
        return []
    if out.returncode != 0:
        fail(f"ldd {binary}: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target == "not":
                fail(f"{binary} needs {parts[0]}, which is not found on this machine")
            if target.startswith("/"):
                libs.append((target, target))
        elif parts and parts[0].startswith("/"):
            libs.append((parts[0], parts[0]))  # the dynamic loader, at the path the binary names
    return libs


class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs = set()
        self.entries = {}

    def _info(self, path, kind, mode):
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type = kind
        info.mode = mode
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _parents(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.entries[d] = (self._info(d, tarfile.DIRTYPE, 0o755), None)

    def directory(self, path, mode=0o755):
        self._parents(path + "/x")
        self.entries[path] = (self._info(path, tarfile.DIRTYPE, mode), None)

    def data(self, path, content, mode=0o644):
        self._parents(path)
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(content)
        self.entries[path] = (info, content)

    def file(self, src, dest):
        try:
            real = os.path.realpath(src)
            with open(real, "rb") as f:
                content = f.read()
            mode = os.stat(real).st_mode & 0o7777
        except OSError as e:
            fail(f"{src}: {e.strerror}")
        self.data(dest, content, mode)

    def symlink(self, path, target):
        self._parents(path)
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[path] = (info, None)

    def finish(self):
        for path in sorted(self.entries):
            info, content = self.entries[path]
            self.tar.addfile(info, io.BytesIO(content) if content is not None else None)
        self.tar.close()
        return self.buf.getvalue()


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image reference, e.g. localhost/headroom:test")
    ap.add_argument("--out", required=True, help="archive to write")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DEST", help="copy a file")
    ap.add_argument("--libs-of", action="append", default=[], metavar="BINARY",
                    help="copy the shared libraries a binary loads (ldd)")
    ap.add_argument("--busybox", metavar="BINARY", help="a static busybox at /bin/busybox, every applet linked in /bin")
    ap.add_argument("--entrypoint", nargs="+", default=[])
    ap.add_argument("--env", action="append", default=[], metavar="K=V")
    ap.add_argument("--user", default="")
    args = ap.parse_args()

    layer = Layer()
    for d in ("/etc", "/tmp", "/var", "/proc", "/sys", "/dev", "/run"):
        layer.directory(d, 0o1777 if d == "/tmp" else 0o755)
    layer.data("/etc/passwd", PASSWD.encode())
    layer.data("/etc/group", GROUP.encode())
    layer.directory("/home/nonroot")
    for spec in args.file:
        src, sep, dest = spec.partition(":")
        if not sep or not dest.startswith("/"):
            fail(f"--file {spec!r}: expected SRC:/absolute/dest")
        layer.file(src, dest)
    for binary in args.libs_of:
        for src, dest in shared_libraries(binary):
            layer.file(src, dest)
    if args.busybox:
        layer.file(args.busybox, "/bin/busybox")
        out = subprocess.run([args.busybox, "--list"], capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"{args.busybox} --list failed: {out.stderr.strip()}")
        for applet in out.stdout.split():
            if applet != "busybox":
                layer.symlink(f"/bin/{applet}", "busybox")
    tar_bytes = layer.finish()
    gz = gzip.compress(tar_bytes, compresslevel=6, mtime=0)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": args.entrypoint or None,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + args.env,
            "User": args.user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(tar_bytes)]},
        "history": [{"created_by": "tests/kube/image/oci-archive.py " + args.name}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(gz), "size": len(gz)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest_bytes), "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.name,
                            "org.opencontainers.image.ref.name": args.name.rsplit(":", 1)[-1]},
        }],
    }

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        def add(name, content):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            out.addfile(info, io.BytesIO(content))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for blob in (config_bytes, manifest_bytes, gz):
            add("blobs/sha256/" + digest(blob).split(":", 1)[1], blob)
    os.replace(tmp, args.out)
    print(f"{args.name}: {args.out} ({len(gz) / 1048576:.1f} MiB layer, {digest(manifest_bytes)})")


if __name__ == "__main__":
    main()
