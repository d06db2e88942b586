"""The options the model commands share."""

import argparse

import pytest
import torch

from pipeline.training.options import add_compute_arguments, apply_threads, int_at_least


def test_int_at_least_names_the_refused_value() -> None:
    parse = int_at_least(2)
    assert parse("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match="1 must be at least 2"):
        parse("1")
    with pytest.raises(argparse.ArgumentTypeError, match="'two' is not an integer"):
        parse("two")


def test_threads_zero_keeps_torch_default_and_a_count_sets_it() -> None:
    parser = argparse.ArgumentParser()
    add_compute_arguments(parser)
    previous = torch.get_num_threads()
    try:
        apply_threads(parser.parse_args([]))
        assert torch.get_num_threads() == previous
        apply_threads(parser.parse_args(["--threads", "1", "--no-cache"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
