"""`--set section.field=value` on the benchmarks changes one validated setting of the config."""

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline_throughput import build_config, parse_setting  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402


def test_a_setting_is_read_as_yaml_and_applied():
    assert parse_setting("detector.interval=3") == ("detector", "interval", 3)
    assert parse_setting("detector.tiles=[1, 1]") == ("detector", "tiles", [1, 1])
    config = build_config(REPO / "configs/pipeline.yaml", "redis://127.0.0.1:1/0", [("detector", "interval", 3)])
    assert config.detector.interval == 3 and config.cameras == [] and not config.metrics.enabled


@pytest.mark.parametrize("text", ["interval=3", "detector.=3", "detector.interval"])
def test_a_malformed_setting_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="section.field=value"):
        parse_setting(text)


def test_a_bad_value_fails_naming_the_field():
    with pytest.raises(ConfigError, match=r"detector\.blazeface\.interval"):
        build_config(REPO / "configs/pipeline.yaml", "redis://127.0.0.1:1/0", [("detector", "interval", 0)])
