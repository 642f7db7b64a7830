"""The `kiln` command line as a user runs it: real processes, help texts, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KILN = [sys.executable, "-m", "kiln.cli.main"]

OPTIONS = {
    "build": ["--output", "--dtype", "--max-seq-len", "--max-batch-size", "--max-num-tokens",
              "--block-size", "--no-progress"],
    "generate": ["--prompt", "--chat", "--n", "--logprobs", "--max-tokens", "--temperature",
                 "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--presence-penalty",
                 "--frequency-penalty", "--seed", "--stop", "--stop-token-id", "--min-tokens",
                 "--ignore-eos", "--device", "--kv-cache-memory", "--skip-verify"],
    "chat": ["--system", "--max-tokens", "--temperature", "--device", "--kv-cache-memory"],
}


def kiln(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KILN, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_top_level_help_lists_commands():
    r = kiln("--help")
    assert r.returncode == 0
    for cmd in OPTIONS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", sorted(OPTIONS))
def test_subcommand_help_describes_every_option(cmd):
    r = kiln(cmd, "--help")
    assert r.returncode == 0
    for opt in OPTIONS[cmd]:
        assert opt in r.stdout, f"{cmd} --help does not mention {opt}"


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_build_of_missing_source_is_one_line(tmp_path):
    assert_one_line_error(kiln("build", tmp_path / "nope", "-o", tmp_path / "e"), "source not found")
    assert not (tmp_path / "e").exists()


def test_max_seq_len_beyond_context_is_refused(tiny_hf_dir, tmp_path):
    r = kiln("build", tiny_hf_dir, "-o", tmp_path / "e", "--max-seq-len", "1000000", "--no-progress")
    assert_one_line_error(r, "exceeds the model's context length")
    assert not (tmp_path / "e").exists()


def test_corrupt_engine_is_refused_in_one_line(tiny_engine, tmp_path):
    bad = tmp_path / "engine"
    shutil.copytree(tiny_engine, bad)
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the weights
    w.write_bytes(bytes(data))
    assert_one_line_error(kiln("generate", bad, "--prompt", "hello", "--device", "cpu"),
                          "sha256 mismatch")
    (bad / "manifest.json").unlink()
    assert_one_line_error(kiln("generate", bad, "--prompt", "hello"), "manifest")


def test_bad_sampling_flag_is_one_line(tiny_engine):
    assert_one_line_error(kiln("generate", tiny_engine, "--prompt", "hi", "--temperature", "5"),
                          "temperature")


def test_build_then_generate_greedy(tiny_hf_dir, tmp_path):
    out = tmp_path / "engine"
    r = kiln("build", tiny_hf_dir, "-o", out, "--dtype", "float32", "--max-seq-len", "256",
             "--block-size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists()
    r = kiln("generate", out, "--prompt", "hello world", "--max-tokens", "5", "--ignore-eos",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "5 generated" in r.stderr and "finish: length" in r.stderr


def test_default_generate_and_chat(default_engine):
    r = kiln("generate", default_engine, "--prompt", "What is the capital of France?", "--chat",
             "--max-tokens", "20", "--skip-verify", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = kiln("chat", default_engine, "--max-tokens", "20", "--skip-verify", "--device", "cpu",
             stdin="What is the capital of France?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
