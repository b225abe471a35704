"""Running trained models: archive-scale batch jobs (todo = manifest minus ledger, staging,
commit), the model actor, int8 on CPUs, and the online endpoint."""
