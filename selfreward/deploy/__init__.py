"""Running the loop on a cluster: `slurm` writes and submits the stages as a chain of jobs; `k8s/` holds one
iteration as Kubernetes Jobs (the Dockerfile at the top of the repository builds the image both use)."""
