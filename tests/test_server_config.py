"""ServerConfig, ServerPlan and server_command as pure functions, plus the real --help check."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llamatelemetry_async import find_llama_server
from llamatelemetry_async._errors import ConfigError, UsageError
from llamatelemetry_async.server._config import (
    _OWNED_FLAGS,
    CACHE_TYPES,
    ServerConfig,
    ServerPlan,
    server_command,
)

GPU0 = ServerPlan("gpu0", (0,))
GPU1 = ServerPlan("gpu1", (1,))
PAIR = ServerPlan("gpu0+1", (0, 1))
CPU = ServerPlan("cpu0", ())
BASE_ENV = {"PATH": "/usr/bin", "HOME": "/home/u"}
HEAD = ["llama-server", "--model", "m.gguf", "--host", "127.0.0.1", "--port", "0"]


def command(
    config: ServerConfig | None = None, plan: ServerPlan = GPU0, **kwargs: Any
) -> tuple[list[str], dict[str, str]]:
    return server_command(
        config or ServerConfig(),
        binary="llama-server",
        model="m.gguf",
        plan=plan,
        base_env=kwargs.pop("base_env", BASE_ENV),
    )


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# -- argv and env --------------------------------------------------------------------------


def test_defaults_on_one_gpu() -> None:
    argv, env = command()
    assert argv == [*HEAD, "--n-gpu-layers", "all", "--metrics", "--slots"]
    assert env == {**BASE_ENV, "CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_defaults_on_cpu() -> None:
    argv, env = command(plan=CPU)
    assert argv == [*HEAD, "--n-gpu-layers", "0", "--device", "none", "--metrics", "--slots"]
    assert env == {**BASE_ENV, "CUDA_VISIBLE_DEVICES": ""}


def test_every_field_maps_to_its_flag() -> None:
    config = ServerConfig(
        n_gpu_layers=20,
        ctx_size=8192,
        n_parallel=4,
        batch_size=1024,
        ubatch_size=256,
        threads=6,
        threads_batch=3,
        poll=0,
        flash_attn="on",
        cache_type_k="q8_0",
        cache_type_v="q4_0",
        split_mode="row",
        tensor_split=(3, 1),
        main_gpu=1,
        embeddings=True,
        pooling="mean",
        metrics=True,
        slots_endpoint=True,
        props=True,
        slot_save_path="/tmp/slots",
        port=8081,
        host="0.0.0.0",
        extra_args=("--seed", "7"),
    )
    argv, _ = server_command(
        config, binary=Path("/b/llama-server"), model=Path("/m/x.gguf"), plan=PAIR
    )
    assert argv == [
        "/b/llama-server",
        "--model", "/m/x.gguf",
        "--host", "0.0.0.0",
        "--port", "8081",
        "--n-gpu-layers", "20",
        "--ctx-size", "8192",
        "--parallel", "4",
        "--batch-size", "1024",
        "--ubatch-size", "256",
        "--threads", "6",
        "--threads-batch", "3",
        "--poll", "0",
        "--flash-attn", "on",
        "--cache-type-k", "q8_0",
        "--cache-type-v", "q4_0",
        "--split-mode", "row",
        "--tensor-split", "3,1",
        "--main-gpu", "1",
        "--embeddings",
        "--pooling", "mean",
        "--metrics",
        "--slots",
        "--props",
        "--slot-save-path", "/tmp/slots",
        "--seed", "7",
    ]  # fmt: skip


def test_switches_off() -> None:
    argv, _ = command(ServerConfig(metrics=False, slots_endpoint=False))
    assert "--metrics" not in argv
    assert "--no-slots" in argv
    assert "--slots" not in argv
    argv, _ = command(ServerConfig(reranking=True))
    assert "--reranking" in argv
    assert "--embeddings" not in argv  # --reranking implies it inside llama-server


@pytest.mark.parametrize(
    ("ngl", "expected"), [(None, "all"), (0, "0"), (33, "33"), ("auto", "auto")]
)
def test_n_gpu_layers_on_gpu(ngl: int | str | None, expected: str) -> None:
    argv, _ = command(ServerConfig(n_gpu_layers=ngl))  # type: ignore[arg-type]
    assert flag_value(argv, "--n-gpu-layers") == expected


def test_pair_with_tensor_split_60_40_and_tensor_mode() -> None:
    plan = ServerPlan("gpu0+1", (0, 1), tensor_split=(0.6, 0.4), split_mode="tensor")
    argv, env = command(plan=plan)
    assert flag_value(argv, "--split-mode") == "tensor"
    assert flag_value(argv, "--tensor-split") == "0.6,0.4"
    assert flag_value(argv, "--n-gpu-layers") == "all"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_plan_split_wins_over_config() -> None:
    config = ServerConfig(split_mode="row", tensor_split=(1, 1))
    plan = ServerPlan("gpu2+3", (2, 3), tensor_split=(0.7, 0.3), split_mode="layer")
    argv, env = command(config, plan=plan)
    assert flag_value(argv, "--split-mode") == "layer"
    assert flag_value(argv, "--tensor-split") == "0.7,0.3"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    # Without plan values the config's apply.
    argv, _ = command(config, plan=ServerPlan("gpu2+3", (2, 3)))
    assert flag_value(argv, "--split-mode") == "row"
    assert flag_value(argv, "--tensor-split") == "1,1"


def test_gpu_ids_are_physical_in_env() -> None:
    _, env = command(plan=GPU1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"


def test_config_tensor_split_must_match_plan_gpu_count() -> None:
    with pytest.raises(ConfigError, match="tensor_split") as info:
        command(ServerConfig(tensor_split=(0.5, 0.3, 0.2)), plan=PAIR)
    assert info.value.field == "tensor_split"
    assert "3 entries" in str(info.value)
    assert "2 GPU" in str(info.value)


def test_main_gpu_is_an_index_inside_the_plan() -> None:
    argv, _ = command(ServerConfig(main_gpu=1), plan=PAIR)
    assert flag_value(argv, "--main-gpu") == "1"
    with pytest.raises(ConfigError, match="main_gpu") as info:
        command(ServerConfig(main_gpu=1), plan=GPU1)
    assert info.value.field == "main_gpu"


def test_tensor_mode_from_plan_needs_flash_attention() -> None:
    plan = ServerPlan("gpu0+1", (0, 1), split_mode="tensor")
    with pytest.raises(ConfigError, match="split_mode") as info:
        command(ServerConfig(flash_attn="off"), plan=plan)
    assert info.value.field == "split_mode"


def test_cpu_plan_forces_no_offload() -> None:
    argv, env = command(ServerConfig(n_gpu_layers="all", main_gpu=0, split_mode="none"), plan=CPU)
    assert flag_value(argv, "--n-gpu-layers") == "0"
    assert flag_value(argv, "--device") == "none"
    assert "--main-gpu" not in argv
    assert "--split-mode" not in argv
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_DEVICE_ORDER" not in env


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (ServerConfig(tensor_split=(1.0,)), "tensor_split"),
        (ServerConfig(split_mode="layer"), "split_mode"),
        (ServerConfig(split_mode="tensor"), "split_mode"),
    ],
)
def test_cpu_plan_refuses_gpu_splits(config: ServerConfig, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        command(config, plan=CPU)
    assert info.value.field == field
    assert "CPU" in str(info.value)


def test_api_key_only_in_env() -> None:
    config = ServerConfig(api_key="s3cret-KEY_1")
    for plan in (GPU0, PAIR, CPU):
        argv, env = command(config, plan=plan)
        assert not any("s3cret" in token for token in argv)
        assert "--api-key" not in argv
        assert env["LLAMA_API_KEY"] == "s3cret-KEY_1"
    assert "s3cret" not in repr(config)


def test_no_api_key_drops_inherited_one() -> None:
    _, env = command(base_env={**BASE_ENV, "LLAMA_API_KEY": "parents"})
    assert "LLAMA_API_KEY" not in env


def test_inherited_llama_arg_variables_are_dropped() -> None:
    base = {**BASE_ENV, "LLAMA_ARG_CTX_SIZE": "99", "LLAMA_ARG_NO_SLOTS": "1", "LLAMA_LOG_X": "1"}
    _, env = command(base_env=base)
    assert "LLAMA_ARG_CTX_SIZE" not in env
    assert "LLAMA_ARG_NO_SLOTS" not in env
    assert env["LLAMA_LOG_X"] == "1"
    assert base["LLAMA_ARG_CTX_SIZE"] == "99"  # the caller's mapping is not touched


def test_base_env_defaults_to_a_copy_of_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLTEST_MARKER", "yes")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    _, env = server_command(ServerConfig(), binary="b", model="m", plan=GPU1)
    assert env["LLTEST_MARKER"] == "yes"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"  # the plan's, replacing the parent's
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_extra_env_is_merged_after_placement_but_not_over_the_key() -> None:
    config = ServerConfig(
        api_key="k", extra_env=(("HOME", "/other"), ("CUDA_DEVICE_ORDER", "FASTEST_FIRST"))
    )
    _, env = command(config)
    assert env["HOME"] == "/other"
    assert env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert env["LLAMA_API_KEY"] == "k"


def test_extra_args_come_last() -> None:
    argv, _ = command(ServerConfig(ctx_size=64, extra_args=("--seed", "1", "--no-webui")))
    assert argv[-3:] == ["--seed", "1", "--no-webui"]


def test_lora_adapters_in_order_with_scales(tmp_path: Path) -> None:
    config = ServerConfig(
        lora=(tmp_path / "a.gguf", ("b.gguf", 0.5)),  # type: ignore[arg-type]
        lora_init_without_apply=True,
    )
    assert config.lora == (str(tmp_path / "a.gguf"), ("b.gguf", 0.5))
    argv, _ = command(config)
    start = argv.index("--lora-scaled")
    # One argument, in order: the adapters' ids are their places in it.
    assert argv[start : start + 3] == [
        "--lora-scaled",
        f"{tmp_path / 'a.gguf'}:1,b.gguf:0.5",
        "--lora-init-without-apply",
    ]
    assert "--lora" not in argv
    plain, _ = command(ServerConfig(lora=("a.gguf", "b.gguf")))
    assert plain[plain.index("--lora") + 1] == "a.gguf,b.gguf"
    assert ServerConfig(lora="one.gguf").lora == ("one.gguf",)  # type: ignore[arg-type]
    bad_paths = [["a,b.gguf"], [("c:d.gguf", 0.5)], ["c:d.gguf", ("e.gguf", 0.5)]]
    for bad in [[("a.gguf", "x")], [("a.gguf", 1, 2)], 3, *bad_paths]:
        with pytest.raises(ConfigError, match="lora") as info:
            ServerConfig(lora=bad)  # type: ignore[arg-type]
        assert info.value.field == "lora"
    with pytest.raises(ConfigError, match="lora"):
        ServerConfig(extra_args=("--lora", "a.gguf"))


def test_lists_are_accepted_and_stored_as_tuples() -> None:
    config = ServerConfig(
        tensor_split=[1, 2],  # type: ignore[arg-type]
        extra_args=["--seed", "1"],  # type: ignore[arg-type]
        extra_env={"A": "1"},  # type: ignore[arg-type]
    )
    assert config.tensor_split == (1, 2)
    assert config.extra_args == ("--seed", "1")
    assert config.extra_env == (("A", "1"),)
    hash(config)


def test_extra_args_as_one_string_is_split_like_a_shell() -> None:
    # A str used to be iterated: one argument per character ("-", "-", "n", ...).
    config = ServerConfig(extra_args="--no-repack --seed 7 --alias 'my model'")  # type: ignore[arg-type]
    assert config.extra_args == ("--no-repack", "--seed", "7", "--alias", "my model")
    argv, _ = command(config)
    assert argv[-5:] == ["--no-repack", "--seed", "7", "--alias", "my model"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("--no-repack -c 4096", "ServerConfig.ctx_size"),
        ("--seed 2 --port 80", "ServerConfig.port"),
        ("--seed 1 --api-key k", "api_key"),
        ("--alias 'unclosed", "cannot split"),
    ],
)
def test_owned_flags_inside_one_string_are_still_refused(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(extra_args=text)  # type: ignore[arg-type]
    assert info.value.field == "extra_args"
    assert fragment in str(info.value)
    assert "'k'" not in str(info.value)


def test_frozen_and_replace_revalidates() -> None:
    config = ServerConfig(batch_size=512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ctx_size = 1  # type: ignore[misc]
    assert config.replace(ctx_size=2048).ctx_size == 2048
    with pytest.raises(ConfigError, match="ubatch_size"):
        config.replace(ubatch_size=1024)


# -- validation ----------------------------------------------------------------------------

INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"n_gpu_layers": -1}, "n_gpu_layers", "auto"),
    ({"n_gpu_layers": "most"}, "n_gpu_layers", "all"),
    ({"n_gpu_layers": True}, "n_gpu_layers", ">= 0"),
    ({"ctx_size": -1}, "ctx_size", ">= 0"),
    ({"n_parallel": 0}, "n_parallel", ">= 1"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"ubatch_size": -5}, "ubatch_size", ">= 1"),
    ({"batch_size": 256, "ubatch_size": 512}, "ubatch_size", "<= batch_size"),
    ({"threads": 0}, "threads", ">= 1"),
    ({"threads": 2.5}, "threads", "int"),
    ({"threads_batch": 0}, "threads_batch", ">= 1"),
    ({"poll": -1}, "poll", ">= 0"),
    ({"poll": 101}, "poll", "0 to 100"),
    ({"cpu_affinity": (0, -1)}, "cpu_affinity", "core id"),
    ({"cpu_affinity": "0-3"}, "cpu_affinity", "core ids"),
    ({"cpu_affinity": (True,)}, "cpu_affinity", "int"),
    ({"extra_args": ("-tb", "2")}, "extra_args", "ServerConfig.threads_batch"),
    ({"extra_args": ("--poll", "0")}, "extra_args", "ServerConfig.poll"),
    ({"flash_attn": "yes"}, "flash_attn", "on, off, auto"),
    ({"cache_type_k": "q9_0"}, "cache_type_k", "q8_0"),
    ({"cache_type_v": "fp8"}, "cache_type_v", "q8_0"),
    ({"cache_type_v": "q8_0", "flash_attn": "off"}, "cache_type_v", "flash"),
    ({"split_mode": "column"}, "split_mode", "none, layer, row, tensor"),
    ({"split_mode": "tensor", "flash_attn": "off"}, "split_mode", "flash"),
    ({"tensor_split": ()}, "tensor_split", "non-empty"),
    ({"tensor_split": (0.5, 0.0)}, "tensor_split", "positive"),
    ({"tensor_split": (1.0, -1.0)}, "tensor_split", "positive"),
    ({"tensor_split": (1.0, float("nan"))}, "tensor_split", "positive"),
    ({"tensor_split": "3,1"}, "tensor_split", "tuple"),
    ({"main_gpu": -1}, "main_gpu", ">= 0"),
    ({"pooling": "max"}, "pooling", "none, mean, cls, last, rank"),
    ({"pooling": "mean", "reranking": True}, "pooling", "rank"),
    ({"embeddings": "yes"}, "embeddings", "True or False"),
    ({"slot_save_path": ""}, "slot_save_path", "non-empty"),
    ({"api_key": ""}, "api_key", "non-empty"),
    ({"api_key": "a,b"}, "api_key", "commas"),
    ({"api_key": "has space"}, "api_key", "spaces"),
    ({"port": -1}, "port", "0"),
    ({"port": 65536}, "port", "65535"),
    ({"host": ""}, "host", "non-empty"),
    ({"host": "127.0.0.1,::1"}, "host", "fixed port"),
    ({"extra_args": ("--api-key", "k")}, "extra_args", "api_key"),
    ({"extra_args": ("--api_key", "k")}, "extra_args", "api_key"),
    ({"extra_args": ("--api-key=k",)}, "extra_args", "api_key"),
    ({"extra_args": ("-c", "4096")}, "extra_args", "ServerConfig.ctx_size"),
    ({"extra_args": ("--ctx_size", "4096")}, "extra_args", "ServerConfig.ctx_size"),
    ({"extra_args": ("--port", "80")}, "extra_args", "ServerConfig.port"),
    ({"extra_args": ("-m", "x.gguf")}, "extra_args", "model argument"),
    ({"extra_args": ("--no-slots",)}, "extra_args", "ServerConfig.slots_endpoint"),
    ({"extra_args": (7,)}, "extra_args", "strings"),
    ({"extra_env": (("LLAMA_API_KEY", "k"),)}, "extra_env", "api_key"),
    ({"extra_env": (("CUDA_VISIBLE_DEVICES", "0"),)}, "extra_env", "placement"),
    ({"extra_env": (("A=B", "1"),)}, "extra_env", "name"),
    ({"extra_env": (("A", "1", "2"),)}, "extra_env", "pairs"),
]


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"), INVALID, ids=[f"{f}:{k}" for k, f, _ in INVALID]
)
def test_invalid_config_names_its_field(kwargs: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, UsageError)


def test_api_key_error_does_not_show_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(api_key="top secret")
    assert "top secret" not in str(info.value)


def test_valid_edge_values() -> None:
    ServerConfig(ctx_size=0, port=65535, n_gpu_layers=0, batch_size=512, ubatch_size=512)
    ServerConfig(pooling="rank", reranking=True, cache_type_v="q8_0", flash_attn="auto")
    ServerConfig(host="::1", api_key="k-_.~!$")
    for cache_type in CACHE_TYPES:
        ServerConfig(cache_type_k=cache_type, cache_type_v=cache_type)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("", (0,)), "name"),
        (("g", (0, 0)), "gpus"),
        (("g", (-1,)), "gpus"),
        (("g", (0, 1), (1.0,)), "tensor_split"),
        (("g", (0, 1), (1.0, 0.0)), "tensor_split"),
        (("g", (), (1.0,)), "tensor_split"),
        (("g", (0,), None, "diagonal"), "split_mode"),
        (("g", (), None, "layer"), "split_mode"),
        (("g", (), None, None, (-1,)), "cores"),
        (("g", (), None, None, (0,), 0), "threads"),
        (("g", (), None, None, (0,), 1, -1), "poll"),
    ],
)
def test_invalid_plan_names_its_field(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerPlan(*args)
    assert info.value.field == field


# -- the real binary -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_binary() -> Path:
    return find_llama_server()


@pytest.fixture(scope="module")
def help_text(real_binary: Path) -> str:
    done = subprocess.run(
        [str(real_binary), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout + done.stderr


def _emittable_argvs() -> list[list[str]]:
    full = ServerConfig(
        n_gpu_layers="all",
        ctx_size=512,
        n_parallel=2,
        batch_size=64,
        ubatch_size=32,
        threads=1,
        threads_batch=1,
        poll=10,
        flash_attn="auto",
        cache_type_k="q8_0",
        cache_type_v="q8_0",
        split_mode="layer",
        main_gpu=0,
        embeddings=True,
        pooling="mean",
        props=True,
        slot_save_path="/tmp",
        api_key="k",
    )
    pair = ServerPlan("gpu0+1", (0, 1), tensor_split=(0.6, 0.4), split_mode="tensor")
    variants = [
        (full, pair),
        (full.replace(split_mode=None, main_gpu=None), CPU),
        (ServerConfig(metrics=False, slots_endpoint=False, reranking=True), GPU0),
        # The adapters' list forms: llama-server parses them before --help acts.
        (ServerConfig(lora=("a.gguf", ("b.gguf", 0.5)), lora_init_without_apply=True), CPU),
        (ServerConfig(lora=("a.gguf", "b.gguf")), CPU),
    ]
    return [
        server_command(config, binary="llama-server", model="m.gguf", plan=plan)[0]
        for config, plan in variants
    ]


def _in_help(flag: str, text: str) -> bool:
    return re.search(rf"(?:^|[\s,]){re.escape(flag)}(?=[\s,]|$)", text, re.MULTILINE) is not None


def test_every_flag_exists_in_the_real_help(help_text: str) -> None:
    emitted = {token for argv in _emittable_argvs() for token in argv[1:] if token[:1] == "-"}
    expected = {
        "--model", "--host", "--port", "--n-gpu-layers", "--device", "--ctx-size", "--parallel",
        "--batch-size", "--ubatch-size", "--threads", "--threads-batch", "--poll",
        "--flash-attn", "--cache-type-k",
        "--cache-type-v", "--split-mode", "--tensor-split", "--main-gpu", "--embeddings",
        "--pooling", "--reranking", "--metrics", "--slots", "--no-slots", "--props",
        "--slot-save-path", "--lora", "--lora-scaled", "--lora-init-without-apply",
    }  # fmt: skip
    assert emitted == expected  # the variants really cover every flag
    missing = sorted(flag for flag in emitted | set(_OWNED_FLAGS) if not _in_help(flag, help_text))
    assert not missing, f"llama-server --help does not list {missing}"
    assert "LLAMA_API_KEY" in help_text  # --api-key's environment variable
    for cache_type in CACHE_TYPES:
        assert cache_type in help_text


def test_real_binary_parses_every_generated_argv(real_binary: Path) -> None:
    # Arguments are parsed in order and --help acts only after all of them parsed, so a
    # wrong flag name or value makes llama-server exit 1 here (checked by hand with --bogus).
    for argv in _emittable_argvs():
        argv = [str(real_binary), *argv[1:], "--help"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    bogus = [str(real_binary), "--no-such-flag", "--help"]
    assert subprocess.run(bogus, capture_output=True, timeout=60, check=False).returncode != 0
