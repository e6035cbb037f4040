"""Spatial edits, sigec's first mode: an engine that records a model's run once and then recomputes
only the blocks an edit touches (analysis passes, both code generators, ``sigec.core.engine.Engine``)."""
from sigec.spatial.build import SpatialMode, build_engine, plan_for

__all__ = ["SpatialMode", "build_engine", "plan_for"]
