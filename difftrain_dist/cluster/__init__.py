"""Cluster launches: Ray Jobs API submission, Slurm sbatch scripts, KubeRay RayJob manifests,
and `.env` secrets that reach the workers without being printed."""
