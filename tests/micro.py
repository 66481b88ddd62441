"""The micro project the tests build on: ``vpr.steps.synth.project`` (the benchmarks use it too)."""

from vpr.steps.synth.project import MICRO_PARAMS, build_micro_project, shard_and_mine, write_params

__all__ = ["MICRO_PARAMS", "build_micro_project", "shard_and_mine", "write_params"]
