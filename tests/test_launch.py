"""bench.runtime.launch: the torchrun command lines (one node, several nodes, pass-through), the launcher
flags' errors, a failing job's report, Ctrl-C, and node 0 / follower hand-over of jobs.
The 2-rank gloo run of the paper profile through the launcher is in test_orchestrate.py."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bench.core.errors import ConfigError
from bench.runtime import launch

ROOT = Path(__file__).resolve().parent.parent


def _args(*argv):
    p = argparse.ArgumentParser()
    launch.add_arguments(p)
    return p.parse_args(list(argv))


def _cfg(*argv, device="cpu", gpus=0):
    return launch.from_args(_args(*argv), device, gpu_count=gpus)


# --------------------------------------------------------------------------- command lines
def test_default_is_in_process():
    assert _cfg() is None
    assert _cfg("--launcher", "inprocess") is None


def test_one_node_command():
    c = _cfg("--nproc", "2")
    assert c.world_size == 2 and c.leader
    cmd = c.command(["eval", "--checkpoint", "x.pt", "--json"], "job1")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:6] == ["--standalone", "--nproc-per-node", "2"]
    assert cmd[6:] == ["-m", "bench.cli", "eval", "--checkpoint", "x.pt", "--json"]
    # a fixed port instead of --standalone's free one
    assert _cfg("--nproc", "2", "--master-port", "29700").torchrun_flags("j") == [
        "--nproc-per-node", "2", "--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1",
        "--master-port", "29700"]


def test_torchrun_on_gpus_defaults_to_the_gpus_present():
    c = _cfg("--launcher", "torchrun", device="cuda", gpus=8)
    assert c.nproc_per_node == 8 and c.cuda and "NCCL" in c.describe()


def test_multi_node_static_command_and_job_store():
    c = _cfg("--nproc", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
             "--master-port", "29600", "--torchrun-args", "--max-restarts 1 --local-addr 10.1.2.4",
             device="cuda", gpus=8)
    assert c.world_size == 16 and not c.leader
    assert c.torchrun_flags("job7") == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
        "--master-port", "29600", "--max-restarts", "1", "--local-addr", "10.1.2.4"]
    assert c.control_address() == ("10.1.2.3", 29601)
    # default port: torchrun's
    d = _cfg("--nproc", "1", "--nnodes", "2", "--master-addr", "node0")
    assert d.torchrun_flags("j")[-2:] == ["--master-port", "29500"] and d.control_address() == ("node0", 29501)


def test_multi_node_c10d_rendezvous_command():
    c = _cfg("--nproc", "4", "--nnodes", "2", "--rdzv-endpoint", "node0:29400")
    assert c.torchrun_flags("pmbench-s-3") == [
        "--nproc-per-node", "4", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", "pmbench-s-3"]
    assert c.control_address() == ("node0", 29401)


@pytest.mark.parametrize("argv, device, gpus, words", [
    (["--launcher", "inprocess", "--nproc", "2"], "cpu", 0, ["--nproc", "--launcher torchrun"]),
    (["--launcher", "inprocess", "--nnodes", "2"], "cpu", 0, ["--nnodes"]),
    (["--nproc", "0"], "cpu", 0, [">= 1"]),
    (["--nproc", "4"], "cuda", 2, ["2 GPU(s)", "--nproc 2"]),
    (["--launcher", "torchrun"], "cpu", 0, ["needs --nproc"]),
    (["--launcher", "torchrun"], "cuda", 0, ["no CUDA GPU"]),
    (["--nproc", "2", "--nnodes", "2"], "cpu", 0, ["--master-addr", "--rdzv-endpoint"]),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a"], "cpu", 0, ["0..1"]),
    (["--nproc", "2", "--nnodes", "0"], "cpu", 0, ["--nnodes"]),
    (["--nproc", "2", "--master-port", "70000"], "cpu", 0, ["--master-port"]),
    (["--nproc", "2", "--rdzv-endpoint", "node0"], "cpu", 0, ["HOST:PORT"]),
    (["--nproc", "2", "--rdzv-endpoint", "n:1", "--master-addr", "n"], "cpu", 0, ["not both"]),
    (["--nproc", "2", "--torchrun-args", "--nproc-per-node 4"], "cpu", 0, ["--nproc-per-node", "--nproc"]),
    (["--nproc", "2", "--torchrun-args=--standalone"], "cpu", 0, ["--standalone", "set by the suite"]),
    (["--nproc", "2", "--torchrun-args", "'unclosed"], "cpu", 0, ["--torchrun-args"]),
])
def test_launcher_flag_errors(argv, device, gpus, words):
    with pytest.raises(ConfigError) as e:
        _cfg(*argv, device=device, gpus=gpus)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_global_batch_must_split_evenly():
    assert launch.per_rank_batch(64, 8, "fine-tuning") == 8
    with pytest.raises(ConfigError, match=r"8 images does not split evenly over 3 processes.*1, 2, 4, 8"):
        launch.per_rank_batch(8, 3, "PM calibration")


def test_orchestrator_refuses_launching_where_nothing_is_launched(capsys):
    from bench import orchestrate

    assert orchestrate.main(["--profile", "smoke", "--nproc", "2"]) == 2
    assert "paper profile" in capsys.readouterr().err
    assert orchestrate.main(["--profile", "paper", "--only", "cost,speed", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "none of the requested stages (cost, speed)" in err and "accuracy and ablations" in err


def test_orchestrator_refuses_an_uneven_batch_split_before_any_compute(tmp_path, monkeypatch, capsys):
    from bench import orchestrate

    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "c"))
    rc = orchestrate.main(["--profile", "paper", "--fixture", "--only", "accuracy", "--nproc", "3",
                           "--device", "cpu", "--out", str(tmp_path / "rep")])
    assert rc == 2
    assert "does not split evenly over 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists() and not list((tmp_path / "c" / "results").rglob("*.json"))


def test_train_config_file_is_checked(tmp_path, capsys):
    from bench.cli import main

    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"lr": 1e-4, "no_such_field": 1}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown TrainConfig field(s) ['no_such_field']" in capsys.readouterr().err
    bad.write_text(json.dumps({"device": "cpu"}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "device are set by flags (--device)" in capsys.readouterr().err


# --------------------------------------------------------------------------- failures
def test_failure_names_the_first_failing_rank_and_its_log(tmp_path):
    logs = tmp_path / "ranks"
    logs.mkdir()
    (logs / "rank0.log").write_text("eval: 50%\n")
    (logs / "rank1.log").write_text("loading\npmbench eval: error: label 7 is outside the model's 3 classes\n")
    tail = ("[rank1]: something\nRoot Cause (first observed failure):\n[0]:\n  time      : x\n  host      : h\n"
            "  rank      : 1 (local_rank: 1)\n  exitcode  : 2 (pid: 1)\n")
    e = launch.failure("eval none", ["python", "-m", "torch.distributed.run"], 1, tail, logs)
    assert isinstance(e, ConfigError)  # bad input in a rank stays bad input
    msg = str(e)
    assert "torchrun job 'eval none' failed: rank 1 exited with code 2 (label 7 is outside" in msg
    assert "rank1.log" in msg and "    loading" in msg
    tail = tail.replace("exitcode  : 2", "exitcode  : 1")
    (logs / "rank1.log").write_text("Traceback (most recent call last):\nRuntimeError: NCCL timeout\n")
    e = launch.failure("train pm", ["x"], 1, tail, logs)
    assert type(e) is RuntimeError and "NCCL timeout" in str(e)


def test_a_failing_torchrun_job_is_one_clear_error(tmp_path):
    """A real 2-rank torchrun job that fails on bad input (a command pmbench does not have: the ranks stop
    before importing torch, so this stays fast): a ConfigError with the rank's own message and log tail;
    the job folder stays for reading."""
    cfg = _cfg("--nproc", "2")
    lines = []

    class Stream:
        def write(self, t):
            lines.append(t)

        def flush(self):
            pass

    lau = launch.Launcher(cfg, tmp_path, stream=Stream())
    with pytest.raises(ConfigError) as e:
        lau.run(["evaluate-all", "--model", "x"], "evaluate everything")
    msg = str(e.value)
    assert "torchrun job 'evaluate everything' failed: rank" in msg and "exited with code 2" in msg
    assert "invalid choice: 'evaluate-all'" in msg.splitlines()[0]
    assert "log of rank" in msg and "pmbench: error:" in msg and "-m bench.cli evaluate-all --model x --json" in msg
    assert "[run_all] torchrun (2 ranks): evaluate everything" in "".join(lines)
    # the failed job's folder stays, with the rank logs (torchrun may stop the other rank before it starts one)
    assert list((tmp_path / "torchrun").glob("*-001-evaluate-all/ranks/rank*.log")) and lau.jobs == []


# --------------------------------------------------------------------------- Ctrl-C
DRIVER = textwrap.dedent("""
    import signal, subprocess, sys
    from pathlib import Path
    from bench.runtime import launch
    # a shell's background job starts with SIGINT ignored, and Python then leaves it ignored: restore what an
    # interactive user's Ctrl-C does, so the test does not depend on how the suite was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = Path(sys.argv[1])
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
             f"open({str(out / 'pid')!r}, 'w').write(str(p.pid)); time.sleep(60)")
    try:
        launch.run_process([sys.executable, "-c", child], env=None, cwd=".", stream=sys.stderr,
                           stdout_path=out / "stdout.log")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def test_ctrl_c_stops_the_whole_process_group(tmp_path):
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(drv), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT)
    pid_file = tmp_path / "pid"
    t0 = time.time()
    while not (pid_file.exists() and pid_file.read_text()) and time.time() - t0 < 60:
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)  # the launched group is up; Ctrl-C now, as a user would
    p.send_signal(signal.SIGINT)
    try:
        out, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        log = (tmp_path / "stdout.log").read_text() if (tmp_path / "stdout.log").exists() else ""
        pytest.fail(f"the driver did not stop within 60 s of Ctrl-C; its stdout: {out!r}; child stdout: {log!r}")
    assert p.returncode == 130 and "interrupted" in out
    t0 = time.time()
    while time.time() - t0 < 10:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the launched group survived Ctrl-C")


# --------------------------------------------------------------------------- several nodes
def _free_port() -> int:
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port < 65000:
            return port


def test_node_zero_hands_every_job_to_the_followers(tmp_path):
    """Node 0 publishes each job; node 1 starts the same pmbench command with its own --node-rank and
    the same rendezvous id; a failure on node 1 stops node 0's job with node 1's message."""
    port = _free_port() - 1  # the job store listens on master-port + 1
    lead = _cfg("--nproc", "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                "--master-port", str(port))
    foll = _cfg("--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                "--master-port", str(port))
    seen = {0: [], 1: []}

    def leader_runner(argv, *, env, abort, **_):
        seen[0].append(argv)
        if "fail-me" in argv:  # wait for node 1's report, as a real job would hang on its peers
            t0 = time.time()
            while time.time() - t0 < 30:
                why = abort()
                if why:
                    return 1, "", why
                time.sleep(0.05)
            return 1, "", None
        Path(env[launch.RESULT_ENV]).write_text(json.dumps({"world_size": 4}))
        return 0, "", None

    def follower_runner(argv, *, env, **_):
        seen[1].append(argv)
        if "fail-me" in argv:
            Path(env[launch.RANK_LOG_ENV], "rank3.log").write_text("pmbench eval: error: boom on node 1\n")
            return 1, "Root Cause\n  rank      : 3 (local_rank: 1)\n  exitcode  : 2\n", None
        return 0, "", None

    class Quiet:
        def write(self, t):
            pass

        def flush(self):
            pass

    rc = {}
    th = threading.Thread(target=lambda: rc.setdefault("f", launch.follow(foll, stream=Quiet(),
                                                                          runner=follower_runner, poll_s=0.05)))
    lau = launch.Launcher(lead, tmp_path, stream=Quiet(), runner=leader_runner)
    th.start()
    assert lau.run(["eval", "--checkpoint", "a.pt"], "eval a") == {"world_size": 4}
    assert lau.run(["train", "--init", "b.pt"], "train b")["world_size"] == 4
    with pytest.raises(RuntimeError, match="node 1 failed: .*boom on node 1"):
        lau.run(["eval", "fail-me"], "eval bad")
    lau.close(wait_s=10)
    th.join(timeout=30)
    assert rc == {"f": 0}
    assert len(seen[0]) == len(seen[1]) == 3
    for a0, a1 in zip(seen[0], seen[1]):
        i0, i1 = a0.index("--node-rank"), a1.index("--node-rank")
        assert (a0[i0 + 1], a1[i1 + 1]) == ("0", "1")
        assert a0[:i0] + a0[i0 + 2:] == a1[:i1] + a1[i1 + 2:]  # otherwise the very same command
    assert seen[0][0][-3:] == ["--checkpoint", "a.pt", "--json"]
    assert [j["command"] for j in lau.jobs] == ["eval", "train"]


def test_follower_refuses_a_different_layout(tmp_path):
    port = _free_port() - 1
    lead = _cfg("--nproc", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    foll = _cfg("--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                "--master-port", str(port))
    msgs = []

    class S:
        def write(self, t):
            msgs.append(t)

        def flush(self):
            pass

    lau = launch.Launcher(lead, tmp_path, stream=S())
    assert launch.follow(foll, stream=S(), connect_timeout_s=20) == 1
    assert any("nproc_per_node = 2, this node with 4" in m for m in msgs)
    lau.close(wait_s=1)


def test_launched_commands_see_the_sources_input_exactly(tmp_path, monkeypatch):
    """The flags a launched pmbench command gets: the source's model, data, resolved preprocessing (floats
    written exactly), label mode, and `cuda` (each rank its own GPU) for a run on cuda:N."""
    import types

    from bench.pipeline.stages.sources import RealSource

    monkeypatch.setenv("PMBENCH_CACHE", str(tmp_path / "c"))
    ctx = types.SimpleNamespace(args=argparse.Namespace(fixture=True, imagenet=None, weights=None),
                                work_dir=tmp_path / "w", device="cuda:1", launcher=None)
    src = RealSource(ctx, None)
    a = src.cli_input_args()
    flag = {a[i]: a[i + 1] for i in range(0, len(a) - 1) if a[i].startswith("--")}
    assert flag["--model"] == "pmbench_tiny_vit" and flag["--data"] == src.data and flag["--device"] == "cuda"
    assert a[a.index("--mean") + 1:a.index("--mean") + 4] == ["0.5", "0.5", "0.5"]
    assert float(flag["--crop-pct"]) == src.prep.crop_pct and flag["--img-size"] == "64"
    assert flag["--labels"] in ("folders", "imagenet-1k") and src.world == 1 and src.launch_key() == {}
