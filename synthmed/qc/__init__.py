"""Quality checks: per-image checks, set-level metrics, label fidelity, memorisation, report."""
