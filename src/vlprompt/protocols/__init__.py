"""The field's evaluation protocols (few-shot, base-to-novel, cross-dataset, domain generalisation)."""
from vlprompt.protocols.runner import PROTOCOLS, BenchConfig, Job, Recipe, plan_jobs, run_bench

__all__ = ["PROTOCOLS", "BenchConfig", "Job", "Recipe", "plan_jobs", "run_bench"]
