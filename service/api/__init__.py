"""The doors: adapters from a transport to the gateway (`service.gateway`)."""
