"""Losses, optimisers and schedules, the train step and programs, the job, the loop."""
