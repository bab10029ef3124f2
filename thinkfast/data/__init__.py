from .sources import DataSpec, Problem, load_problems, parse_spec

__all__ = ["DataSpec", "Problem", "load_problems", "parse_spec"]
