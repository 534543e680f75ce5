"""Build and find the served graph's onnxruntime custom op library (export/csrc/slot_attention.cc).

    python -m export.custom_ops build      compile it (make install does this); prints the library's path
    python -m export.custom_ops path       print where the runner looks for it (exit 1 if it is not there)

The op is compiled against onnxruntime's C/C++ API headers. PyPI's onnxruntime wheels ship none, so they come
from `ORT_INCLUDE_DIR` when set, else from Debian's `libonnxruntime-dev` package (MIT-licensed headers only,
85 KB), downloaded once from deb.debian.org, checked against its SHA-256 and unpacked with the standard
library. The API is ABI-stable: a library built against version N loads into any onnxruntime >= N (the headers
are API 21, onnxruntime 1.21; the project requires onnxruntime >= 1.21).

Standard library only, so the serving image's build stage can run it with a bare python3 and a C++ compiler.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "csrc" / "slot_attention.cc"
LIBRARY_NAME = "libinstructlm_ops.so"
DOMAIN = "ai.instructlm"
ENV_LIBRARY = "INSTRUCTLM_OPS_LIBRARY"
ENV_INCLUDE = "ORT_INCLUDE_DIR"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Debian 13 (trixie), main: the package and its SHA-256 as its Packages index lists them.
HEADERS_DEB = "pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADERS_INDEX = "dists/trixie/main/binary-amd64/Packages.xz"
NEEDED_HEADER = "onnxruntime_cxx_api.h"
CXXFLAGS = [
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    # Lets the compiler vectorize the dot-product and softmax reductions (a different summation order,
    # ~1e-7 relative); errno, traps and signed zeros are never looked at.
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
]


class OpsBuildError(RuntimeError):
    """The custom op library could not be built; the message says which step failed and what to do."""


def default_library() -> Path:
    """Where the library is built and looked for: $INSTRUCTLM_OPS_LIBRARY, else export/_ops/ in the package."""
    env = os.environ.get(ENV_LIBRARY)
    return Path(env) if env else HERE / "_ops" / LIBRARY_NAME


def find_library() -> Path | None:
    lib = default_library()
    return lib if lib.is_file() else None


def slot_attention_model(heads: int, kv_heads: int, head_dim: int) -> bytes:
    """A one-node ONNX model of the SlotAttention op (the inputs as export/csrc/slot_attention.cc lists them),
    for tests and benchmarks of the op alone. Needs the `onnx` package (imported here, not at module level)."""
    from onnx import TensorProto, helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("q", f, ["B", "S", heads * head_dim]),
        helper.make_tensor_value_info("k", f, ["B", "S", kv_heads, head_dim]),
        helper.make_tensor_value_info("v", f, ["B", "S", kv_heads, head_dim]),
        helper.make_tensor_value_info("past_k", f, ["N", kv_heads, "L", head_dim]),
        helper.make_tensor_value_info("past_v", f, ["N", kv_heads, "L", head_dim]),
        helper.make_tensor_value_info("slot_ids", i64, ["R"]),
        helper.make_tensor_value_info("position_ids", i64, ["B", "S"]),
        helper.make_tensor_value_info("seq_lens", i64, ["R"]),
    ]
    node = helper.make_node("SlotAttention", [i.name for i in inputs], ["out"], domain=DOMAIN)
    out = [helper.make_tensor_value_info("out", f, ["B", "S", heads * head_dim])]
    graph = helper.make_graph([node], "slot_attention", inputs, out)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=ops).SerializeToString()


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as exc:
        raise OpsBuildError(
            f"downloading {url} failed ({exc}); set {ENV_INCLUDE} to a directory holding onnxruntime's "
            f"{NEEDED_HEADER} (the libonnxruntime-dev package or an onnxruntime release)"
        ) from None


def _deb_data(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive: 8-byte magic, then 60-byte headers and bodies)."""
    if not deb.startswith(b"!<arch>\n"):
        raise OpsBuildError("the downloaded headers package is not a .deb archive")
    off = 8
    while off + 60 <= len(deb):
        name = deb[off : off + 16].decode().strip().rstrip("/")
        size = int(deb[off + 48 : off + 58].decode().strip())
        body = deb[off + 60 : off + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            return tarfile.open(fileobj=io.BytesIO(body))
        off += 60 + size + (size & 1)
    raise OpsBuildError("the headers package has no data.tar member")


def _index_entry() -> tuple[str, str]:
    """(Filename, SHA256) of libonnxruntime-dev in trixie's current index: the pinned file can be superseded."""
    text = lzma.decompress(_fetch(f"{MIRROR}/{HEADERS_INDEX}")).decode("utf-8", "replace")
    for block in text.split("\n\n"):
        if block.startswith("Package: libonnxruntime-dev\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            return fields["Filename"], fields["SHA256"]
    raise OpsBuildError(f"{MIRROR}/{HEADERS_INDEX} lists no libonnxruntime-dev")


def headers(cache: Path) -> Path:
    """A directory holding onnxruntime_cxx_api.h and the headers it includes."""
    env = os.environ.get(ENV_INCLUDE)
    if env:
        if not (Path(env) / NEEDED_HEADER).is_file():
            raise OpsBuildError(f"{ENV_INCLUDE}={env}: no {NEEDED_HEADER} there")
        return Path(env)
    if (cache / NEEDED_HEADER).is_file():
        return cache
    url, sha = f"{MIRROR}/{HEADERS_DEB}", HEADERS_SHA256
    try:
        deb = _fetch(url)
    except OpsBuildError:
        filename, sha = _index_entry()
        url = f"{MIRROR}/{filename}"
        deb = _fetch(url)
    got = hashlib.sha256(deb).hexdigest()
    if got != sha:
        raise OpsBuildError(f"{url}: SHA-256 {got}, expected {sha}; not using it")
    tmp = Path(tempfile.mkdtemp(prefix=".include-", dir=cache.parent))
    tmp.chmod(0o755)
    try:
        with _deb_data(deb) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # ./usr/include/onnxruntime/<relative path>.h: keep the relative path, nothing else
                if member.isfile() and "include" in parts and member.name.endswith(".h"):
                    rel = Path(*parts[parts.index("include") + 2 :])
                    if ".." in rel.parts or not rel.parts:
                        continue
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        if not (tmp / NEEDED_HEADER).is_file():
            raise OpsBuildError(f"{url}: no {NEEDED_HEADER} inside")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def build(out: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Compile the library to `out` (default: `default_library()`) unless it is newer than its source."""
    out = Path(out) if out else default_library()
    if not force and out.is_file() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    include = headers(out.parent / "include")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise OpsBuildError("no C++ compiler (g++ or $CXX) found; on Debian: apt-get install g++")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    cmd = [cxx, *CXXFLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp)]
    if not quiet:
        print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OpsBuildError(f"{cxx} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.custom_ops", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the library (skipped when it is newer than its source)")
    b.add_argument("--out", type=Path, help=f"default: ${ENV_LIBRARY} or {default_library()}")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    sub.add_parser("path", help="print the library's path; exit 1 when it is not built")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        try:
            print(build(args.out, args.force))
        except OpsBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    lib = find_library()
    print(lib or default_library())
    return 0 if lib else 1


if __name__ == "__main__":
    raise SystemExit(main())
