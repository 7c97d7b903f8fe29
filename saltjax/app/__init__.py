"""The application: what main.py runs, process set-up, config checks."""
