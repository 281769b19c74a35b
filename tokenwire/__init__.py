"""tokenwire: the contract package. Generated code lives in tokenwire.v1."""
