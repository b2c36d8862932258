"""Generated gRPC stubs for proto/membank/v1 land here (`make stubs`); nothing else."""
