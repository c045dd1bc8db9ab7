"""What a run reports: the metrics log (JSONL, W&B), the run summary and the HTML report."""
