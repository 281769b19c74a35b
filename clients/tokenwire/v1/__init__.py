"""Generated Python stubs of the tokenwire.v1 contract (protos/tokenwire/v1). Do not edit: run `make proto`."""
