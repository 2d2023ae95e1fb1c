"""What a run reports: the pruning report, the model card, the plan plot, and the dry run's estimate."""
