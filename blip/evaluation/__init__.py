"""Evaluation: the loops over a task's eval sets (loops), the scores (metrics), the compositional probes."""
