"""Downstream evaluation: metrics (eval.metrics), embedding/zero-shot scoring (eval.zeroshot)."""
