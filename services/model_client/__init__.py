"""The device side of membank. `bank_client.BankClient` fetches manifests and blocks from a
bank server and trusts a block only when its bytes match the manifest's checksum.
"""
