"""The pure building blocks of the web cache's file serving: path resolution under a document
root (webcache.paths) and the HTTP semantics of static files (webcache.semantics)."""

from __future__ import annotations

import calendar
import errno
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcs.errors import McsError
from webcache import paths as paths_mod
from webcache.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    DocumentRoot,
    FileChanged,
    Forbidden,
    NotFound,
    PathError,
    ResolvedFile,
)
from webcache.semantics import (
    RangeNotSatisfiable,
    content_type,
    etag,
    http_date,
    if_range_ok,
    is_not_modified,
    parse_etags,
    parse_http_date,
    parse_range,
    precondition_failed,
)

NS = 1_000_000_000

# ===========================================================================================
# paths
# ===========================================================================================


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a document root and a sibling directory that must never be served."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (outside / "index.html").write_text("SECRET INDEX")
    (outside / "noindex").mkdir()
    (root / "index.html").write_text("root index")
    (root / "page.txt").write_text("page")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_text("sub index")
    (root / "sub" / "a.css").write_text("body{}")
    (root / "empty").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("not the real one")
    (root / ".well-known").mkdir()
    (root / ".well-known" / "security.txt").write_text("contact")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / ".env").write_text("KEY=1")
    # symlinks
    (root / "to_passwd").symlink_to("/etc/passwd")
    (root / "to_outside_dir").symlink_to(outside)
    (root / "to_outside_noindex").symlink_to(outside / "noindex")
    (root / "rel_escape").symlink_to("../outside/secret.txt")
    (root / "to_page").symlink_to(root / "page.txt")
    (root / "rel_to_page").symlink_to("page.txt")
    (root / "chain").symlink_to("rel_to_page")
    (root / "to_sub").symlink_to("sub")
    (root / "dangling").symlink_to("no-such-target")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "to_devnull").symlink_to("/dev/null")
    (root / "idx_out").mkdir()
    (root / "idx_out" / "index.html").symlink_to(outside / "secret.txt")
    (root / "idx_dir").mkdir()
    (root / "idx_dir" / "index.html").mkdir()
    # a path that leaves the root and comes back: the file served is inside, so it is allowed
    (outside / "back").symlink_to(root / "sub")
    (root / "out_and_back").symlink_to(outside)
    os.mkfifo(root / "fifo")
    return root, outside


@pytest.fixture(params=["proc_fd", "realpath"])
def docroot(request: pytest.FixtureRequest, tree: tuple[Path, Path]) -> DocumentRoot:
    """The tree's DocumentRoot, with each lookup strategy (Linux /proc fast path, portable)."""
    root = DocumentRoot(tree[0])
    if request.param == "realpath":
        root._proc_fd = False
    else:
        assert root._proc_fd, "the /proc fast path should be available on Linux"
    return root


def served(root: DocumentRoot, url: str, raw: str | None = None) -> str:
    """The content served for ``url`` (the resolved file read back)."""
    with open(root.resolve(url, raw).path) as fh:
        return fh.read()


# -- construction ---------------------------------------------------------------------------


def test_root_must_be_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        DocumentRoot(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        DocumentRoot(tmp_path / "file")


def test_root_is_canonical(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f.txt").write_text("x")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    root = DocumentRoot(str(tmp_path / "alias") + "/")
    assert root.root == os.path.realpath(tmp_path / "real")
    assert root.resolve("/f.txt").path == os.path.join(root.root, "f.txt")
    assert repr(root) == f"DocumentRoot({root.root!r})"


def test_filesystem_root_as_document_root() -> None:
    root = DocumentRoot("/")
    assert root.resolve("/etc/passwd").path == "/etc/passwd"


# -- hits -----------------------------------------------------------------------------------


def test_hit_carries_the_stat_of_the_file(docroot: DocumentRoot, tree: tuple[Path, Path]) -> None:
    f = docroot.resolve("/sub/a.css")
    real = os.path.realpath(tree[0] / "sub" / "a.css")
    st_ = os.stat(real)
    assert f == ResolvedFile(real, st_.st_size, st_.st_mtime_ns,
                             st_.st_ino, st_.st_dev, st_.st_ctime_ns)
    assert f == ResolvedFile.from_stat(f.path, st_)
    with pytest.raises(AttributeError):  # immutable
        f.size = 0  # type: ignore[misc]


@pytest.mark.parametrize("url, content", [
    ("/", "root index"),
    ("/./././", "root index"),
    ("/.", "root index"),
    ("//", "root index"),
    ("/sub", "sub index"),          # no trailing slash needed
    ("/sub/", "sub index"),
    ("/sub/index.html", "sub index"),
    ("//sub//a.css", "body{}"),     # duplicate slashes collapse
    ("/sub/./a.css", "body{}"),
    ("/./sub/.//a.css", "body{}"),
    ("//etc/passwd", "not the real one"),  # under the root, never /etc/passwd
    ("/.well-known/security.txt", "contact"),
    ("/to_page", "page"),            # symlinks inside the root are followed
    ("/rel_to_page", "page"),
    ("/chain", "page"),
    ("/to_sub/a.css", "body{}"),
    ("/to_sub", "sub index"),
    ("/out_and_back/back/a.css", "body{}"),  # leaves and comes back: the file is inside
])
def test_allowed_paths(docroot: DocumentRoot, url: str, content: str) -> None:
    assert served(docroot, url) == content
    assert served(docroot, url, url) == content


def test_symlink_inside_resolves_to_the_target(docroot: DocumentRoot,
                                                tree: tuple[Path, Path]) -> None:
    root = os.path.realpath(tree[0])
    assert docroot.resolve("/to_page").path == os.path.join(root, "page.txt")
    assert docroot.resolve("/to_sub/").path == os.path.join(root, "sub", "index.html")


def test_non_ascii_names(docroot: DocumentRoot, tree: tuple[Path, Path]) -> None:
    (tree[0] / "café ☕.txt").write_text("coffee")
    assert served(docroot, "/café ☕.txt", "/caf%C3%A9%20%E2%98%95.txt") == "coffee"


def test_literal_percent_names(docroot: DocumentRoot, tree: tuple[Path, Path]) -> None:
    """A double-encoded ``..`` decodes once to the literal name ``%2e%2e``: a plain name."""
    (tree[0] / "%2e%2e").mkdir()
    (tree[0] / "%2e%2e" / "x").write_text("literal")
    assert served(docroot, "/%2e%2e/x", "/%252e%252e/x") == "literal"
    assert served(docroot, "/%2e%2e/x") == "literal"  # without raw_path: still a plain name


def test_query_string_of_raw_path_is_ignored(docroot: DocumentRoot) -> None:
    assert served(docroot, "/page.txt", "/page.txt?next=/%2e%2e/%2f%00") == "page"


# -- refusals -------------------------------------------------------------------------------

LONG_SEGMENT = "/" + "a" * (MAX_SEGMENT_BYTES + 1)
LONG_UTF8_SEGMENT = "/" + "é" * (MAX_SEGMENT_BYTES // 2 + 1)  # 256 bytes in 128 characters
LONG_PATH = "/" + "/".join(["a" * 200] * 21)                   # > 4096 bytes, short segments

ESCAPES: list[tuple[str, str | None, type[PathError], str]] = [
    # (decoded path, raw path, refusal, reason contains)
    ("/../etc/passwd", "/../etc/passwd", Forbidden, "'..'"),
    ("/../etc/passwd", None, Forbidden, "'..'"),
    ("/a/../../x", None, Forbidden, "'..'"),
    ("/sub/../page.txt", None, Forbidden, "'..'"),  # even when it would stay inside
    ("/..", None, Forbidden, "'..'"),
    ("/sub/..", None, Forbidden, "'..'"),
    # aiohttp decodes %2F and %2e: the decoded form has real '..' segments
    ("/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", Forbidden, ""),
    ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", Forbidden, "'..'"),
    ("/../etc", "/.%2e/etc", Forbidden, "'..'"),
    ("/../etc", "/%2E%2e/etc", Forbidden, "'..'"),
    # a decoder that leaves them encoded: the raw check still refuses them
    ("/%2e%2e/%2e%2e/etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", Forbidden, "'..'"),
    ("/.%2E/etc", "/.%2E/etc", Forbidden, "'..'"),
    ("/..%2fetc", "/..%2fetc", Forbidden, "encoded slash"),
    ("/..%2fetc", None, Forbidden, "hidden"),  # no raw: the literal name starts with a dot
    ("/sub/%2e%2e%2f%2e%2e%2fetc/passwd", "/sub/%2e%2e%2f%2e%2e%2fetc/passwd", Forbidden,
     "encoded slash"),
    ("/a/b", "/a%2Fb", Forbidden, "encoded slash"),
    ("/a\\b", "/a%5cb", Forbidden, ""),
    # NUL, backslash, control characters, lone surrogates
    ("/\x00", "/%00", Forbidden, "NUL"),
    ("/\x00", None, Forbidden, "NUL"),
    ("/%00", "/%00", Forbidden, "NUL"),  # left encoded by the decoder: raw check
    ("/a\x00b.txt", None, Forbidden, "NUL"),
    ("/page.txt\x00.html", None, Forbidden, "NUL"),
    ("/\\..\\etc\\passwd", "/\\..\\etc\\passwd", Forbidden, "backslash"),
    ("/sub\\a.css", None, Forbidden, "backslash"),
    ("/a\nb", None, Forbidden, "control"),
    ("/a\rb", None, Forbidden, "control"),
    ("/a\tb", None, Forbidden, "control"),
    ("/a\x1bb", None, Forbidden, "control"),
    ("/a\x7fb", None, Forbidden, "control"),
    ("/a\x85b", None, Forbidden, "control"),
    ("/a%0ab", "/a%0ab", Forbidden, "control"),
    ("/a\udcffb", None, Forbidden, "invalid character"),
    ("/a\ud800b", None, Forbidden, "invalid character"),
    ("/" + "\ud800" * 2000, None, Forbidden, "too long"),  # long before it is invalid
    # not absolute
    ("etc/passwd", None, Forbidden, "absolute"),
    ("", None, Forbidden, "absolute"),
    ("*", None, Forbidden, "absolute"),
    # too long
    (LONG_SEGMENT, None, Forbidden, "too long"),
    (LONG_UTF8_SEGMENT, None, Forbidden, "too long"),
    ("/" + "a" * 5000, None, Forbidden, "too long"),
    (LONG_PATH, None, Forbidden, "too long"),
    # hidden files
    ("/.git/config", None, Forbidden, "hidden"),
    ("/.env", None, Forbidden, "hidden"),
    ("/sub/.htaccess", None, Forbidden, "hidden"),
    ("/...", None, Forbidden, "hidden"),
    ("/.git/config", "/%2egit/config", Forbidden, "hidden"),
    # symlinks leading out
    ("/to_passwd", None, Forbidden, "outside"),
    ("/to_outside_dir/secret.txt", None, Forbidden, "outside"),
    ("/to_outside_dir", None, Forbidden, "outside"),       # its index.html is outside
    ("/to_outside_dir/", None, Forbidden, "outside"),
    ("/to_outside_noindex", None, Forbidden, "outside"),  # outside, even with no index
    ("/rel_escape", None, Forbidden, "outside"),
    ("/to_devnull", None, Forbidden, "outside"),
    ("/idx_out", None, Forbidden, "outside"),             # index.html links out
    ("/loop1", None, Forbidden, "symbolic links"),
    # not regular files
    ("/fifo", None, Forbidden, "regular"),
    ("/idx_dir", None, Forbidden, "regular"),  # index.html is a directory
    # missing
    ("/nope.html", None, NotFound, ""),
    ("/sub/nope/x", None, NotFound, ""),
    ("/empty", None, NotFound, ""),            # a directory without index.html
    ("/empty/", None, NotFound, ""),
    ("/page.txt/", None, NotFound, ""),        # a trailing slash on a file
    ("/page.txt/.", None, NotFound, ""),
    ("/page.txt/x", None, NotFound, ""),       # a file in the middle
    ("/dangling", None, NotFound, ""),
    ("/%2e%2e/%2e%2e/etc/passwd", None, NotFound, ""),   # literal names, no raw path
    ("/%2e%2e/x", "/%252e%252e/x", NotFound, ""),        # double encoding: literal name
    ("/%00", "/%2500", NotFound, ""),
    ("/" + "a" * MAX_SEGMENT_BYTES, None, NotFound, ""),  # longest segment: allowed
    ("/" + "é" * (MAX_SEGMENT_BYTES // 2), None, NotFound, ""),
]


@pytest.mark.parametrize("url, raw, error, reason", ESCAPES,
                         ids=[repr(e[0][:40]) + (f" raw={e[1][:30]!r}" if e[1] else "")
                              for e in ESCAPES])
def test_refused_paths(docroot: DocumentRoot, url: str, raw: str | None,
                       error: type[PathError], reason: str) -> None:
    with pytest.raises(error) as info:
        docroot.resolve(url, raw)
    assert type(info.value) is error
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_fifo_is_refused_without_blocking(docroot: DocumentRoot) -> None:
    t0 = time.monotonic()
    with pytest.raises(Forbidden, match="regular"):
        docroot.resolve("/fifo")
    assert time.monotonic() - t0 < 5


def test_socket_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    sock_path = root / "s"
    if len(os.fsencode(sock_path)) >= 100:
        pytest.skip("tmp path too long for an AF_UNIX socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
        for proc_fd in (True, False):
            docroot = DocumentRoot(root)
            docroot._proc_fd = proc_fd and docroot._proc_fd
            with pytest.raises(Forbidden, match="regular"):
                docroot.resolve("/s")


def test_path_length_limit_is_in_bytes(docroot: DocumentRoot) -> None:
    exact = "/" + "/".join(["a" * 200] * 20)
    exact += "/" + "b" * (MAX_PATH_BYTES - len(exact) - 1)
    assert len(exact.encode()) == MAX_PATH_BYTES
    assert docroot.relative(exact) == exact[1:]  # allowed by the string checks
    with pytest.raises(Forbidden, match="too long"):
        docroot.relative(exact + "b")
    # the root's own path makes it longer than PATH_MAX: the kernel's ENAMETOOLONG is a 403
    with pytest.raises(Forbidden, match="too long"):
        docroot.resolve(exact)
    euro = "/" + "/".join(["€" * 84] * 16) + "/" + "€" * 21  # segments of 252 bytes
    assert len(euro) < MAX_PATH_BYTES // 2 and len(euro.encode()) > MAX_PATH_BYTES
    with pytest.raises(Forbidden, match="too long"):
        docroot.relative(euro)


def test_hidden_files_can_be_allowed(tree: tuple[Path, Path]) -> None:
    root = DocumentRoot(tree[0], allow_hidden=True)
    assert served(root, "/.env") == "KEY=1"
    assert served(root, "/.git/config", "/%2egit/config") == "[core]"
    with pytest.raises(Forbidden, match="'..'"):
        root.resolve("/sub/../page.txt")
    with pytest.raises(Forbidden, match="'..'"):
        root.resolve("/../x", "/%2e%2E/x")
    (tree[0] / "...").write_text("dots")
    assert served(root, "/...") == "dots"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_and_untraversable_directory(tree: tuple[Path, Path]) -> None:
    root_dir = tree[0]
    (root_dir / "locked.txt").write_text("x")
    os.chmod(root_dir / "locked.txt", 0)
    (root_dir / "closed").mkdir()
    (root_dir / "closed" / "f.txt").write_text("x")
    os.chmod(root_dir / "closed", 0)
    try:
        for proc_fd in (True, False):
            docroot = DocumentRoot(root_dir)
            docroot._proc_fd = proc_fd and docroot._proc_fd
            with pytest.raises(Forbidden, match="permission"):
                docroot.resolve("/locked.txt")
            with pytest.raises(Forbidden, match="permission"):
                docroot.resolve("/closed/f.txt")
    finally:
        os.chmod(root_dir / "closed", 0o755)


class _FakeOs:
    """The os module, with some functions replaced (patched into webcache.paths only)."""

    def __init__(self, **overrides: object) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


def test_unreadable_file_is_refused_every_time(monkeypatch: pytest.MonkeyPatch,
                                               docroot: DocumentRoot) -> None:
    """Readability is checked on each resolve: a cached copy of a file that became
    unreadable must not be served (works even when the suite runs as root)."""
    assert docroot.resolve("/page.txt")
    monkeypatch.setattr(paths_mod, "os", _FakeOs(access=lambda path, mode: False))
    with pytest.raises(Forbidden, match="permission"):
        docroot.resolve("/page.txt")


def test_file_deleted_during_resolution_is_not_found(monkeypatch: pytest.MonkeyPatch,
                                                     tree: tuple[Path, Path]) -> None:
    """A file really deleted between the open and the check: the next look finds no file."""
    docroot = DocumentRoot(tree[0])
    target = tree[0] / "page.txt"
    looks = []

    def fstat_after_unlink(fd: int) -> os.stat_result:
        if target.exists():
            target.unlink()  # the deletion lands right between the open and the check
        looks.append(fd)
        return os.fstat(fd)

    monkeypatch.setattr(paths_mod, "os", _FakeOs(fstat=fstat_after_unlink))
    with pytest.raises(NotFound):
        docroot.resolve("/page.txt")
    assert len(looks) == 1  # the second look got ENOENT from the kernel


def test_file_replaced_at_every_look_is_changed_not_missing(monkeypatch: pytest.MonkeyPatch,
                                                           tree: tuple[Path, Path]) -> None:
    """A file renamed over between the open and the check at every attempt is being replaced:
    503 (FileChanged), never 404 (it existed at every look), after RESOLVE_ATTEMPTS looks."""
    docroot = DocumentRoot(tree[0])
    target = tree[0] / "page.txt"
    spare = tree[0] / ".next"
    looks = []

    def fstat_after_replace(fd: int) -> os.stat_result:
        spare.write_bytes(b"version %d" % len(looks))
        os.replace(spare, target)  # the deploy's rename lands between the open and the check
        looks.append(fd)
        return os.fstat(fd)

    monkeypatch.setattr(paths_mod, "os", _FakeOs(fstat=fstat_after_replace))
    with pytest.raises(FileChanged, match="replaced"):
        docroot.resolve("/page.txt")
    assert len(looks) == paths_mod.RESOLVE_ATTEMPTS


@pytest.mark.parametrize("code, error, reason", [
    (errno.ENOENT, NotFound, "no such file"),
    (errno.ENOTDIR, NotFound, "no such file"),
    (errno.EACCES, Forbidden, "permission denied"),
    (errno.EPERM, Forbidden, "permission denied"),
    (errno.ELOOP, Forbidden, "symbolic links"),
    (errno.ENAMETOOLONG, Forbidden, "too long"),
])
def test_os_errors_map_to_http_refusals(code: int, error: type[PathError], reason: str) -> None:
    mapped = paths_mod._map_os_error(OSError(code, os.strerror(code)))
    assert type(mapped) is error and reason in str(mapped)


def test_unexpected_os_errors_propagate(monkeypatch: pytest.MonkeyPatch,
                                        docroot: DocumentRoot) -> None:
    eio = OSError(errno.EIO, "I/O error")
    assert paths_mod._map_os_error(eio) is eio

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(paths_mod, "os", _FakeOs(open=failing, stat=failing))
    monkeypatch.setattr(paths_mod, "openat2", failing)
    with pytest.raises(OSError) as info:
        docroot.resolve("/page.txt")
    assert info.value.errno == errno.EIO and not isinstance(info.value, PathError)


def test_error_classes() -> None:
    assert issubclass(PathError, McsError)
    assert issubclass(Forbidden, PathError) and Forbidden("x").status == 403
    assert issubclass(NotFound, PathError) and NotFound("x").status == 404
    exc = Forbidden("hidden file")
    assert exc.reason == "hidden file" == str(exc)


@pytest.mark.parametrize("url, rel", [
    ("/", ""),
    ("/./", ""),
    ("//", ""),
    ("/a", "a"),
    ("/a/", "a/"),
    ("//a//b//", "a/b/"),
    ("/a/./b", "a/b"),
    ("/a/.", "a/"),
    ("/.well-known/x", ".well-known/x"),
    ("/" + "x" * 100 + "/y", "x" * 100 + "/y"),
])
def test_relative_normalisation(tree: tuple[Path, Path], url: str, rel: str) -> None:
    assert DocumentRoot(tree[0]).relative(url) == rel


_TOKENS = ["..", ".", "", "a", "sub", "page.txt", "to_outside_dir", "to_passwd", "rel_escape",
           "out_and_back", "back", "etc", "passwd", "%2e%2e", "%2e", ".%2e", "%2f", "%252e",
           "\\", "\x00", "secret.txt", "noindex", "fifo", "loop1", "to_sub", "%00", "..%2f"]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_TOKENS), max_size=8), st.booleans())
def test_nothing_outside_the_root_is_ever_returned(tree: tuple[Path, Path],
                                                   tokens: list[str], decode: bool) -> None:
    """Whatever the path, resolve either refuses it or returns a regular file inside."""
    root = DocumentRoot(tree[0])
    raw = "/" + "/".join(tokens)
    url = raw.replace("%2f", "/").replace("%2e", ".").replace("%00", "\x00") if decode else raw
    for docroot_raw in (raw, None):
        for proc_fd in (True, False):
            root._proc_fd = proc_fd
            try:
                f = root.resolve(url, docroot_raw)
            except PathError:
                continue
            assert f.path.startswith(root.root + "/")
            assert stat.S_ISREG(os.stat(f.path).st_mode)
            assert "SECRET" not in Path(f.path).read_text()


# ===========================================================================================
# semantics
# ===========================================================================================

# -- content types --------------------------------------------------------------------------


@pytest.mark.parametrize("path, ctype", [
    ("/r/index.html", "text/html; charset=utf-8"),
    ("/r/INDEX.HTM", "text/html; charset=utf-8"),
    ("a.css", "text/css; charset=utf-8"),
    ("a.txt", "text/plain; charset=utf-8"),
    ("a.csv", "text/csv; charset=utf-8"),
    ("a.md", "text/markdown; charset=utf-8"),
    ("a.js", "text/javascript; charset=utf-8"),
    ("a.mjs", "text/javascript; charset=utf-8"),
    ("a.JS", "text/javascript; charset=utf-8"),
    ("a.json", "application/json; charset=utf-8"),
    ("a.js.map", "application/json; charset=utf-8"),
    ("a.webmanifest", "application/manifest+json; charset=utf-8"),
    ("a.xml", "text/xml; charset=utf-8"),
    ("a.svg", "image/svg+xml; charset=utf-8"),
    ("a.png", "image/png"),
    ("a.jpg", "image/jpeg"),
    ("a.jpeg", "image/jpeg"),
    ("a.gif", "image/gif"),
    ("a.webp", "image/webp"),
    ("a.avif", "image/avif"),
    ("a.ico", "image/vnd.microsoft.icon"),
    ("a.woff", "font/woff"),
    ("a.woff2", "font/woff2"),
    ("a.wasm", "application/wasm"),
    ("a.pdf", "application/pdf"),
    ("a.mp4", "video/mp4"),
    ("a.zip", "application/zip"),
    ("a.tar.gz", "application/gzip"),  # not application/x-tar: no Content-Encoding is sent
    ("a.tgz", "application/gzip"),
    ("a.svgz", "application/gzip"),
    ("a.txt.bz2", "application/x-bzip2"),
    ("a.tar.xz", "application/x-xz"),
    ("a.br", "application/octet-stream"),
    ("a.bin", "application/octet-stream"),
    ("a.unknownext", "application/octet-stream"),
    ("README", "application/octet-stream"),
    (".profile", "application/octet-stream"),
    ("/dir.html/file", "application/octet-stream"),  # only the last segment counts
    ("trailing.", "application/octet-stream"),
    ("data:text.html", "text/html; charset=utf-8"),  # never parsed as a data: URL
])
def test_content_type(path: str, ctype: str) -> None:
    assert content_type(path) == ctype


# -- validators -----------------------------------------------------------------------------


def test_etag_format() -> None:
    tag = etag(0x1234, 0x17979CFE3D85CD15, 0x2A, 0x17979CFE3D85CD16)
    assert tag == '"1234-17979cfe3d85cd15-2a-17979cfe3d85cd16"'
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith('W/')
    assert parse_etags(tag) == [(False, tag)]


def test_etag_changes_with_each_field() -> None:
    base = etag(10, 1_000, 7, 2_000)
    assert len({base, etag(11, 1_000, 7, 2_000), etag(10, 1_001, 7, 2_000),
                etag(10, 1_000, 8, 2_000), etag(10, 1_000, 7, 2_001)}) == 5
    assert etag(10, 1_000, 7, 2_000) == base  # deterministic


def test_etag_of_a_pre_1970_file_is_valid() -> None:
    tag = etag(1, -5, 2, -5)
    assert tag == '"1-fffffffffffffffb-2-fffffffffffffffb"'
    assert etag(1, -5, 2, -5) != etag(1, 5, 2, -5)
    assert parse_etags(tag) == [(False, tag)]


@pytest.mark.parametrize("mtime_ns, text", [
    (784111777 * NS, "Sun, 06 Nov 1994 08:49:37 GMT"),
    (784111777 * NS + NS - 1, "Sun, 06 Nov 1994 08:49:37 GMT"),  # truncated to the second
    (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
    (-1, "Thu, 01 Jan 1970 00:00:00 GMT"),                       # clamped: pre-1970
    (-10**20, "Thu, 01 Jan 1970 00:00:00 GMT"),
    (10**30, "Fri, 31 Dec 9999 23:59:59 GMT"),                    # clamped: 4-digit year
    (1700000000 * NS, "Tue, 14 Nov 2023 22:13:20 GMT"),
])
def test_http_date(mtime_ns: int, text: str) -> None:
    assert http_date(mtime_ns) == text


def test_http_date_round_trips() -> None:
    for seconds in (0, 1, 951782400, 1700000000, 2**31 + 5, 253402300799):
        assert parse_http_date(http_date(seconds * NS)) == seconds


_NOV6 = 784111777


@pytest.mark.parametrize("value, seconds", [
    ("Sun, 06 Nov 1994 08:49:37 GMT", _NOV6),             # IMF-fixdate
    ("  Sun, 06 Nov 1994 08:49:37 GMT\t", _NOV6),          # surrounding OWS
    ("Sunday, 06-Nov-94 08:49:37 GMT", _NOV6),             # obsolete RFC 850
    ("Sun Nov  6 08:49:37 1994", _NOV6),                   # asctime
    ("Sun Nov 16 08:49:37 1994", _NOV6 + 10 * 86400),
    ("Mon, 06 Nov 1994 08:49:37 GMT", _NOV6),              # day name not cross-checked
    ("Thu, 29 Feb 2024 00:00:00 GMT", calendar.timegm((2024, 2, 29, 0, 0, 0))),
    ("Wed, 31 Dec 1969 23:59:59 GMT", -1),
    ("Sun, 06 Nov 1994 23:59:60 GMT", calendar.timegm((1994, 11, 7, 0, 0, 0))),  # leap second
    ("Sun, 06 Nov 1994 08:49:37 UTC", None),
    ("Sun, 06 Nov 1994 08:49:37 +0000", None),
    ("sun, 06 nov 1994 08:49:37 gmt", None),               # case-sensitive
    ("Sun, 6 Nov 1994 08:49:37 GMT", None),                # 2-digit day required
    ("Sun, 06 Nov 94 08:49:37 GMT", None),
    ("Sun, 31 Feb 1994 08:49:37 GMT", None),               # impossible dates
    ("Sun, 29 Feb 2023 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 24:00:00 GMT", None),
    ("Sun, 06 Nov 1994 08:60:00 GMT", None),
    ("Sun, 06 Nov 1994 08:49:61 GMT", None),
    ("Sun, 06 Foo 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 0000 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT; length=42", None),
    ("Sun, ٠٦ Nov 1994 08:49:37 GMT", None),               # non-ASCII digits
    ("1994-11-06T08:49:37Z", None),
    ("784111777", None),
    ("", None),
    (None, None),
])
def test_parse_http_date(value: str | None, seconds: int | None) -> None:
    assert parse_http_date(value) == seconds


def test_rfc850_two_digit_year_is_at_most_50_years_ahead() -> None:
    this_year = time.gmtime().tm_year
    soon = (this_year + 10) % 100
    late = (this_year + 60) % 100
    got_soon = parse_http_date(f"Monday, 01-Jan-{soon:02d} 00:00:00 GMT")
    got_late = parse_http_date(f"Monday, 01-Jan-{late:02d} 00:00:00 GMT")
    assert got_soon is not None and time.gmtime(got_soon).tm_year == this_year + 10
    assert got_late is not None and time.gmtime(got_late).tm_year == this_year + 60 - 100


@pytest.mark.parametrize("value, tags", [
    ('"a"', [(False, '"a"')]),
    ('W/"a"', [(True, '"a"')]),
    ('"a", W/"b" ,"c"', [(False, '"a"'), (True, '"b"'), (False, '"c"')]),
    ('"a,b", "c"', [(False, '"a,b"'), (False, '"c"')]),   # a comma inside a tag
    (', ,"a",,', [(False, '"a"')]),                       # empty list elements
    ('""', [(False, '""')]),
    ('', []),
    ('a', None),                                          # unquoted
    ('"a', None),
    ('"a" "b"', None),                                    # missing comma
    ('w/"a"', None),                                      # W/ is case-sensitive
    ('"a b"', None),
    ('*', None),
])
def test_parse_etags(value: str, tags: list[tuple[bool, str]] | None) -> None:
    assert parse_etags(value) == tags


# -- conditional requests --------------------------------------------------------------------

TAG = etag(100, 1_700_000_000 * NS + 5, 42, 1_700_000_000 * NS + 9)
MTIME = 1_700_000_000 * NS + 5                   # 22:13:20.000000005
LM = http_date(MTIME)                            # "Tue, 14 Nov 2023 22:13:20 GMT"
BEFORE = http_date(MTIME - NS)
AFTER = http_date(MTIME + NS)
NOW = 1_800_000_000.0


@pytest.mark.parametrize("headers, expected", [
    ({}, False),
    ({"If-None-Match": TAG}, True),
    ({"If-None-Match": f"W/{TAG}"}, True),                      # weak comparison
    ({"If-None-Match": f'"x", {TAG}'}, True),
    ({"If-None-Match": f' "x" ,W/{TAG} '}, True),
    ({"If-None-Match": "*"}, True),
    ({"If-None-Match": " * "}, True),
    ({"If-None-Match": '"x"'}, False),
    ({"If-None-Match": TAG[1:-1]}, False),                       # unquoted: malformed
    ({"If-None-Match": f"{TAG} junk"}, False),
    ({"If-None-Match": ""}, False),
    ({"If-None-Match": f"*, {TAG}"}, False),                     # '*' only alone
    # If-None-Match present: If-Modified-Since is not looked at
    ({"If-None-Match": '"x"', "If-Modified-Since": LM}, False),
    ({"If-None-Match": TAG, "If-Modified-Since": BEFORE}, True),
    ({"If-Modified-Since": LM}, True),                           # same second
    ({"If-Modified-Since": AFTER}, True),
    ({"If-Modified-Since": BEFORE}, False),
    ({"If-Modified-Since": "Sunday, 14-Nov-23 22:13:20 GMT"}, True),
    ({"If-Modified-Since": "Tue Nov 14 22:13:20 2023"}, True),
    ({"If-Modified-Since": "garbage"}, False),
    ({"If-Modified-Since": http_date(int(NOW + 10) * NS)}, False),  # in the future: ignored
])
def test_is_not_modified(headers: dict[str, str], expected: bool) -> None:
    assert is_not_modified(headers, TAG, MTIME, now=NOW) is expected


def test_is_not_modified_compares_whole_seconds() -> None:
    mtime = 1_700_000_000 * NS + NS - 1  # 22:13:20.999999999: Last-Modified says :20
    assert is_not_modified({"If-Modified-Since": http_date(mtime)}, TAG, mtime, now=NOW)
    assert not is_not_modified({"If-Modified-Since": http_date(mtime)}, TAG, mtime + 1, now=NOW)


def test_is_not_modified_uses_the_clock_by_default() -> None:
    mtime = (int(time.time()) - 100) * NS
    assert is_not_modified({"If-Modified-Since": http_date(mtime)}, TAG, mtime)
    future = (int(time.time()) + 3600) * NS
    assert not is_not_modified({"If-Modified-Since": http_date(future)}, TAG, mtime)


@pytest.mark.parametrize("headers, failed", [
    ({}, False),
    ({"If-Match": TAG}, False),
    ({"If-Match": "*"}, False),
    ({"If-Match": f'"x", {TAG}'}, False),
    ({"If-Match": f"W/{TAG}"}, True),                    # strong comparison
    ({"If-Match": '"x"'}, True),
    ({"If-Match": "junk"}, True),
    ({"If-Match": TAG, "If-Unmodified-Since": BEFORE}, False),  # If-Match decides alone
    ({"If-Unmodified-Since": LM}, False),
    ({"If-Unmodified-Since": AFTER}, False),
    ({"If-Unmodified-Since": BEFORE}, True),
    ({"If-Unmodified-Since": "garbage"}, False),
])
def test_precondition_failed(headers: dict[str, str], failed: bool) -> None:
    assert precondition_failed(headers, TAG, MTIME) is failed


def test_weak_own_tag_never_matches_strongly() -> None:
    weak = "W/" + TAG
    assert is_not_modified({"If-None-Match": TAG}, weak, MTIME)
    assert precondition_failed({"If-Match": TAG}, weak, MTIME)
    assert not if_range_ok({"If-Range": TAG}, weak, MTIME)


@pytest.mark.parametrize("headers, ok", [
    ({}, True),
    ({"If-Range": TAG}, True),
    ({"If-Range": f" {TAG} "}, True),
    ({"If-Range": '"x"'}, False),
    ({"If-Range": f"W/{TAG}"}, False),                     # weak tags never match
    ({"If-Range": f"{TAG}, {TAG}"}, False),               # one tag, not a list
    ({"If-Range": TAG[:-1]}, False),
    ({"If-Range": LM}, True),                             # exact date, second is over
    ({"If-Range": AFTER}, False),                         # not an exact match
    ({"If-Range": BEFORE}, False),
    ({"If-Range": "Tue Nov 14 22:13:20 2023"}, True),
    ({"If-Range": "garbage"}, False),
])
def test_if_range_ok(headers: dict[str, str], ok: bool) -> None:
    assert if_range_ok(headers, TAG, MTIME, now=NOW) is ok


def test_if_range_date_of_the_current_second_is_weak() -> None:
    now = MTIME / NS + 0.5  # the file changed within the current second: it may change again
    assert not if_range_ok({"If-Range": LM}, TAG, MTIME, now=now)
    assert if_range_ok({"If-Range": LM}, TAG, MTIME, now=now + 1)
    assert if_range_ok({"If-Range": TAG}, TAG, MTIME, now=now)  # an ETag is strong anyway


# -- ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, size, span", [
    (None, 100, None),
    ("bytes=0-0", 100, (0, 1)),
    ("bytes=0-99", 100, (0, 100)),
    ("bytes=10-19", 100, (10, 20)),
    ("bytes=99-99", 100, (99, 100)),
    ("bytes=10-", 100, (10, 100)),
    ("bytes=0-", 100, (0, 100)),
    ("bytes=50-1000", 100, (50, 100)),                  # last clamped to size-1
    ("bytes=-10", 100, (90, 100)),                      # suffix
    ("bytes=-100", 100, (0, 100)),
    ("bytes=-1000", 100, (0, 100)),                     # longer than the file: all of it
    ("bytes=-1", 1, (0, 1)),
    ("bytes=0-0", 1, (0, 1)),
    ("BYTES=1-2", 100, (1, 3)),                         # the unit is case-insensitive
    ("Bytes=1-2", 100, (1, 3)),
    (" bytes = 1-2 ", 100, (1, 3)),                     # OWS around
    ("bytes=1-2,", 100, (1, 3)),                        # empty list elements
    ("bytes=, 1-2", 100, (1, 3)),
    ("bytes=0001-0002", 100, (1, 3)),                   # leading zeros
    ("bytes=0-" + "9" * 40, 100, (0, 100)),             # a huge last-pos: clamped
    ("bytes=-" + "9" * 40, 100, (0, 100)),              # a huge suffix: all of it
    ("bytes=" + "0" * 40 + "5-6", 100, (5, 7)),         # long only by its leading zeros
    ("bytes=9223372036854775806-", 2**63, (2**63 - 2, 2**63)),
    # ignored: serve 200 with the whole body
    ("bytes=0-1,3-4", 100, None),                       # multi-range
    ("bytes=0-1, 0-1", 100, None),
    ("bytes=-1,0-0", 100, None),
    ("bytes=", 100, None),
    ("bytes=-", 100, None),
    ("bytes=,", 100, None),
    ("bytes=5-4", 100, None),                           # last < first: invalid
    ("bytes=a-b", 100, None),
    ("bytes=1-2-3", 100, None),
    ("bytes=1 - 2", 100, None),
    ("bytes=+1-2", 100, None),
    ("bytes=-+1", 100, None),
    ("bytes=0x10-20", 100, None),
    ("bytes=１-２", 100, None),                         # full-width digits
    ("bytes=²-³", 100, None),                           # str.isdigit() would accept these
    ("bytes=1.5-2", 100, None),
    ("items=0-1", 100, None),                           # an unknown unit
    ("bytes 0-1", 100, None),
    ("0-1", 100, None),
    ("", 100, None),
    ("bytes=5-4", 0, None),
])
def test_parse_range(value: str | None, size: int, span: tuple[int, int] | None) -> None:
    assert parse_range(value, size) == span


@pytest.mark.parametrize("value, size", [
    ("bytes=100-", 100),                                # first byte past the end
    ("bytes=100-200", 100),
    ("bytes=1000-2000", 100),
    ("bytes=-0", 100),                                  # an empty suffix
    ("bytes=0-", 0),                                    # any range of an empty file
    ("bytes=0-0", 0),
    ("bytes=-5", 0),
    ("bytes=" + "9" * 40 + "-", 100),                   # a huge first-pos
    ("bytes=" + "9" * 40 + "-" + "9" * 41, 100),
    ("bytes=18446744073709551616-", 2**63),
])
def test_unsatisfiable_range(value: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(value, size)
    assert info.value.size == size
    assert info.value.content_range == f"bytes */{size}"
    assert isinstance(info.value, McsError)


def test_huge_numbers_are_cheap() -> None:
    """Never int() of a huge digit string (Python limits those to 4300 digits)."""
    t0 = time.monotonic()
    assert parse_range("bytes=0-" + "9" * 100_000, 10) == (0, 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=" + "9" * 100_000 + "-", 10)
    assert time.monotonic() - t0 < 1


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.integers(0, 2 * 10**6), st.integers(0, 2 * 10**6),
       st.sampled_from(["full", "open", "suffix"]))
def test_range_is_always_within_the_file(size: int, a: int, b: int, form: str) -> None:
    value = {"full": f"bytes={a}-{b}", "open": f"bytes={a}-", "suffix": f"bytes=-{b}"}[form]
    try:
        span = parse_range(value, size)
    except RangeNotSatisfiable:
        assert size == 0 or (form == "suffix" and b == 0) or (form != "suffix" and a >= size)
        return
    if span is None:
        assert form == "full" and b < a
        return
    start, stop = span
    assert 0 <= start < stop <= size
    if form == "full":
        assert start == a and stop == min(b + 1, size)
    elif form == "open":
        assert (start, stop) == (a, size)
    else:
        assert (start, stop) == (max(0, size - b), size)
