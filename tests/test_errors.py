"""The exception tree crosses process boundaries: an error raised in a Ray actor (or a
multiprocessing worker) is pickled there and must arrive as itself, fields and all."""

from __future__ import annotations

import pickle

import pytest

from llamatelemetry_async import _errors as errors

CASES: list[errors.LlamaError] = [
    errors.ConfigError("ctx_size must be > 0", field="ctx_size"),
    errors.PromptFileError("prompts.jsonl", 3, "not JSON"),
    errors.TransportError("broken", url="http://127.0.0.1:9"),
    errors.ConnectError("refused", url="http://127.0.0.1:9"),
    errors.APIError("server said no", status_code=500, error_type="server", body="x", url="u"),
    errors.HTTPStatusError("bad", status_code=400, error_type="invalid", body={"a": 1}, url="u"),
    errors.LlamaServerNotFoundError("no llama-server", searched=["PATH: none"]),
    errors.BuildError("cmake failed", log_tail="tail"),
    errors.BuildArchiveError("corrupt", archive="/kaggle/input/x/b.tar.gz"),
    errors.CUDAArchitectureError(
        "T4 vs sm_90",
        binary="/b/llama-server",
        architectures=("sm_90",),
        gpus=(0,),
        compute_capabilities=("7.5",),
    ),
    errors.ServerStartError("exited", server="ray0", exit_code=1, log_tail="bad model"),
    errors.ServerCrashedError("died", server="gpu0", exit_code=-9),
    errors.ServerUnavailableError("none", servers=("a", "b"), log_tail="x"),
    errors.ModelError("bad model", model="m.gguf"),
    errors.ModelNotFoundError("missing", model="m.gguf", tried=["/a"]),
    errors.ModelFormatError("not GGUF", model="m", problem="magic"),
    errors.ModelDoesNotFitError("too big", model="m", suggestions=["Q4"]),
    errors.QuantizeError("failed", model="m", returncode=2, log_tail="t"),
    errors.MergeLoraError("failed", model="m", returncode=1, log_tail="t"),
    errors.NCCLError("init", code=1, name="ncclUnhandledCudaError", error_string="e"),
    errors.NCCLNotFoundError("no nccl", searched=["x"]),
    errors.NCCLSymbolError("missing", symbol="ncclFoo"),
    errors.EngineError("closed"),
]


def test_every_class_with_fields_of_its_own_is_covered() -> None:
    own_init = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.LlamaError) and "__init__" in vars(cls)
    }
    # A private base is covered through its public subclasses; a public class only by itself.
    covered = {type(case) for case in CASES}
    covered |= {c for case in CASES for c in type(case).__mro__ if c.__name__.startswith("_")}
    assert own_init - covered == set()


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_an_error_survives_pickling_as_itself(error: errors.LlamaError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.args == error.args
    assert vars(back) == vars(error)
