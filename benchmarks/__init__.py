"""Speed of ours against the course-style reference; run each as `python -m benchmarks.NAME`
from the repository root (benchmarks/README.md)."""
