"""The quality report: fidelity, isolation and base preservation against the baselines."""
