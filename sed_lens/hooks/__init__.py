"""Training-time hooks: gradient capture and subspace interventions."""
