"""Many runs as one experiment: sweeps and their launchers, the report with seeds and intervals,
the figures, and the paper's published numbers to compare with."""
