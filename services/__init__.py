"""membank services: the bank server (`bank_server`) and the device-side client (`model_client`).

Each service builds its settings once in its own `main()` and passes them down; code below
`main()` never reads the environment.
"""
