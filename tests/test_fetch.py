"""Data files from their sources, against an HTTP server this test starts on 127.0.0.1: a fetch into
empty folders through the mirror setting, a transfer cut in the middle and resumed, a wrong checksum
refused with nothing left behind, 404, a server that hangs and one that dies mid-transfer, offline
mode, a listing that downloads nothing, text files in another encoding. No test touches the internet."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import write

ROWS = "".join(f"{'good' if i % 2 else 'bad'} example number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(400))
CSV = ("text,label\n" + ROWS).encode()
SHA = hashlib.sha256(CSV).hexdigest()


class Server:
    """Serves ``files`` (path -> bytes) with Range support; ``modes`` (path -> how) misbehave:
    ``cut-once`` sends half the body then closes (the next request works), ``cut`` always does,
    ``hang`` never answers, ``missing`` is a 404."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                mode = server.modes.get(path, "ok")
                if mode == "hang":
                    time.sleep(3)
                    return
                body = server.files.get(path)
                if body is None or mode == "missing":
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "cut" or (mode == "cut-once" and start == 0):
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        s.files["mine/reviews.csv"] = CSV
        yield s


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data directory content, an empty cache, fast time-outs and retries."""
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MTL_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("MTL_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("MTL_DOWNLOAD_BACKOFF", "0.01")
    monkeypatch.delenv("MTL_OFFLINE", raising=False)
    (tmp_path / "data").mkdir()
    return tmp_path


def task_file(folder: Path, url: str, sha256: str = SHA) -> Path:
    return write(folder / "tasks" / "reviews.yaml", f"""\
name: reviews
modality: text
description: A review task whose data is downloaded.
role: held_out
source:
  format: csv
  path: mine/reviews.csv
  download:
    mine/reviews.csv:
      url: [{url}]
      sha256: {sha256}
input_field: text
label_field: label
splits:
  by: examples
  sizes: {{train: 0.5, test: 0.5}}
""")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_fetch_into_empty_folders_through_the_mirror(empty, server, run_cli, monkeypatch):
    task_file(empty, "https://example.invalid/reviews.csv")  # the original host is never contacted
    monkeypatch.setenv("MTL_DATA_MIRROR", server.url)
    tasks = ["--tasks-dir", empty / "tasks"]
    code, out, err = run_cli("data", "status", "reviews", *tasks, "--json")
    assert code == 0, err
    (row,) = json.loads(out)["files"]
    assert not row["present"] and row["source"] == f"{server.url}/mine/reviews.csv"
    code, out, err = run_cli("data", "fetch", "reviews", *tasks, "--json")
    assert code == 0, err
    target = empty / "cache" / "data" / "mine" / "reviews.csv"
    assert target.read_bytes() == CSV and json.loads(out)["fetched"][0]["where"] == str(target)
    assert server.requests == [("mine/reviews.csv", None)]
    code, out, _ = run_cli("data", "status", "reviews", *tasks, "--json")
    assert json.loads(out)["files"][0]["present"] and json.loads(out)["files"][0]["where"] == str(target)
    code, out, err = run_cli("tasks", "show", "reviews", *tasks, "--json")
    assert code == 0, err
    assert json.loads(out)["classes"] == ["neg", "pos"] and len(server.requests) == 1  # no second download


def test_a_local_mirror_wins_and_nothing_is_downloaded(empty, server, run_cli):
    task_file(empty, f"{server.url}/mine/reviews.csv")
    write(empty / "data" / "mine" / "reviews.csv", CSV.decode())
    code, _, err = run_cli("tasks", "show", "reviews", "--tasks-dir", empty / "tasks", "--json")
    assert code == 0, err
    assert server.requests == [] and not (empty / "cache" / "data").exists()


def test_a_cut_transfer_is_resumed_with_a_range_request(empty, server):
    from mtl.data.fetch import fetch
    from mtl.data.schema import Download

    server.modes["mine/reviews.csv"] = "cut-once"
    path = fetch("mine/reviews.csv", Download(url=f"{server.url}/mine/reviews.csv", sha256=SHA))
    assert path.read_bytes() == CSV
    _, (_, rng) = server.requests
    assert rng == f"bytes={len(CSV) // 2}-"  # only the missing half was asked for
    assert leftovers(empty / "cache") == ["reviews.csv"]


def test_a_part_left_by_an_interrupted_run_is_continued(empty, server):
    from mtl.data.fetch import fetch
    from mtl.data.schema import Download

    part = write(empty / "cache" / "data" / "mine" / "reviews.csv.part", CSV[:1000].decode())
    assert part.exists()
    fetch("mine/reviews.csv", Download(url=f"{server.url}/mine/reviews.csv", sha256=SHA))
    assert server.requests == [("mine/reviews.csv", "bytes=1000-")]
    assert leftovers(empty / "cache") == ["reviews.csv"]


def test_a_wrong_checksum_is_refused_and_nothing_is_left(empty, server, run_cli):
    task_file(empty, f"{server.url}/mine/reviews.csv", sha256=hashlib.sha256(b"other").hexdigest())
    code, _, err = run_cli("data", "fetch", "reviews", "--tasks-dir", empty / "tasks")
    assert code == 2 and "checksum mismatch" in err and "deleted" in err and len(err.strip().splitlines()) == 1
    assert leftovers(empty / "cache") == []


@pytest.mark.parametrize("mode,expect", [("missing", "HTTP 404"), ("hang", "attempts"), ("cut", "attempts")])
def test_failures_are_one_line_naming_the_file_url_and_where_to_put_it(empty, server, run_cli, mode, expect):
    task_file(empty, f"{server.url}/mine/reviews.csv")
    server.modes["mine/reviews.csv"] = mode
    started = time.monotonic()
    code, _, err = run_cli("tasks", "show", "reviews", "--tasks-dir", empty / "tasks")
    assert time.monotonic() - started < 20  # time-outs and retries are bounded
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    target = empty / "cache" / "data" / "mine" / "reviews.csv"
    assert expect in err and "mine/reviews.csv" in err and str(target) in err
    assert not target.exists()  # never a half file under the final name
    if mode == "cut":  # the bytes that did arrive are kept for the next try
        assert (target.parent / "reviews.csv.part").stat().st_size > 0
        assert len(server.requests) == 3 and server.requests[-1][1] is not None


def test_offline_mode_says_where_to_put_the_file(empty, server, run_cli, monkeypatch):
    task_file(empty, f"{server.url}/mine/reviews.csv")
    monkeypatch.setenv("MTL_OFFLINE", "1")
    code, _, err = run_cli("tasks", "show", "reviews", "--tasks-dir", empty / "tasks")
    assert code == 2 and "MTL_OFFLINE" in err and f"{server.url}/mine/reviews.csv" in err
    assert str(empty / "cache" / "data" / "mine" / "reviews.csv") in err and server.requests == []


def test_tasks_list_marks_missing_data_and_downloads_nothing(empty, server, run_cli):
    task_file(empty, f"{server.url}/mine/reviews.csv")
    code, out, err = run_cli("tasks", "list", "--tasks-dir", empty / "tasks", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["tasks"]}
    assert rows["reviews"]["missing"] == ["mine/reviews.csv"] and rows["mnist"]["missing"]
    assert server.requests == []


def test_text_in_another_encoding(tmp_path):
    from mtl.data.registry import Registry

    text = "".join(f"{'DESC' if i % 2 else 'LOC'}:def what is a caf\u00e9 number {i} ?\n" for i in range(40))
    (tmp_path / "trec.txt").write_bytes(text.encode("latin-1"))
    base = f"""\
name: trec-latin
modality: text
description: question types, saved as latin-1
role: held_out
source:
  format: split_lines
  path: {tmp_path / "trec.txt"}
  sep: " "
  header: false
  columns: [label, text]
  {{enc}}
input_field: text
label_field: label
splits: {{{{by: examples, sizes: {{{{train: 0.5, test: 0.5}}}}}}}}
"""
    write(tmp_path / "t" / "trec.yaml", base.format(enc=""))
    with pytest.raises(Exception, match="encoding"):
        Registry([tmp_path / "t"], ).load("trec-latin")
    write(tmp_path / "t" / "trec.yaml", base.format(enc="encoding: latin-1"))
    task = Registry([tmp_path / "t"]).load("trec-latin")
    assert "what is a caf\u00e9 number 1 ?" in task.train.inputs.tolist() + task.test.inputs.tolist()
