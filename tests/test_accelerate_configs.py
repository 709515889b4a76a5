"""The accelerate config files in examples/accelerate/ parse with accelerate's own loader and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


@pytest.mark.parametrize(
    ("name", "distributed_type", "check"),
    [
        ("ddp.yaml", "MULTI_GPU", lambda c: True),
        ("fsdp.yaml", "FSDP", lambda c: c.fsdp_config["fsdp_version"] == 2),
        ("deepspeed_zero2.yaml", "DEEPSPEED", lambda c: c.deepspeed_config["zero_stage"] == 2),
        ("deepspeed_zero3.yaml", "DEEPSPEED", lambda c: c.deepspeed_config["zero_stage"] == 3),
    ],
)
def test_config_parses(name, distributed_type, check):
    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    assert str(config.distributed_type).endswith(distributed_type)
    assert check(config)
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
