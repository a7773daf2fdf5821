"""The public surface: ``__all__`` matches what the package exposes, and the contract names."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch.distributed.checkpoint as dcp

import aiodcp


def test_all_is_sorted_and_matches_public_names() -> None:
    # dir(), not vars(): the names whose modules need the S3 stack are imported on first access
    public = {name for name in dir(aiodcp) if not name.startswith("_")}
    public -= {"annotations", "dcp", "safetensors"}  # the __future__ import; the subpackages
    assert sorted(aiodcp.__all__) == aiodcp.__all__
    assert set(aiodcp.__all__) - {"__version__"} == public
    for name in aiodcp.__all__:
        assert getattr(aiodcp, name) is not None, name


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(aiodcp, n) for n in aiodcp.__all__ if n.endswith("Error")]
    assert len(errors) >= 15
    for error in errors:
        assert issubclass(error, aiodcp.AiodcpError), error
    assert issubclass(aiodcp.NotFoundError, FileNotFoundError)
    assert issubclass(aiodcp.AccessDeniedError, PermissionError)
    assert issubclass(aiodcp.SequentialAccessError, ValueError)
    assert issubclass(aiodcp.ReaderTypeError, TypeError)


def test_contract_signatures() -> None:
    reader = inspect.signature(aiodcp.S3StorageReader)
    params = list(reader.parameters.values())
    assert params[0].name == "path" and params[0].kind is params[0].POSITIONAL_OR_KEYWORD
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:])
    assert {"region", "endpoint_url"} <= set(reader.parameters)
    load = inspect.signature(aiodcp.load_checkpoint)
    names = list(load.parameters)
    assert names[:2] == ["state_dict", "checkpoint_id"]
    assert {"region", "endpoint_url", "planner", "process_group", "no_dist"} <= set(names)
    assert inspect.iscoroutinefunction(aiodcp.load_checkpoint)


def test_storage_reader_is_a_complete_dcp_storage_reader() -> None:
    assert issubclass(aiodcp.S3StorageReader, dcp.StorageReader)
    assert not getattr(aiodcp.S3StorageReader, "__abstractmethods__", None)
    # torch looks for a parameter literally named "kwargs" to pass rank-local arguments.
    assert "kwargs" in inspect.signature(aiodcp.S3StorageReader.read_metadata).parameters
    sig = inspect.signature(aiodcp.S3StorageReader.set_up_storage_reader)
    assert "kwargs" in sig.parameters


def test_config_is_frozen_and_keyword_only() -> None:
    config = aiodcp.ReaderConfig(max_gap_size=0)
    with pytest.raises(AttributeError):
        config.max_gap_size = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        aiodcp.ReaderConfig("us-east-1")  # type: ignore[misc]
    assert config.replace(part_size=1024).part_size == 1024


def test_max_gap_size_takes_auto_everywhere() -> None:
    for entry in (aiodcp.S3StorageReader, aiodcp.load_checkpoint, aiodcp.prefetch):
        param = inspect.signature(entry).parameters["max_gap_size"]
        assert param.kind is param.KEYWORD_ONLY and param.default is None, entry
        assert str(param.annotation) == "int | float | str | None", entry
    assert aiodcp.ReaderConfig().max_gap_size == "auto"
    assert "max_gap_size" in {f.name for f in dataclasses.fields(aiodcp.LoadStats)}
