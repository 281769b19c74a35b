"""tokenwire: the contract package. Generated code lives in tokenwire.v1 (part of the tokenwire-client distribution)."""
