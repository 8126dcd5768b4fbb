"""How big a run is: measured profiles, slots per host, forecasts of time and cost, the instance table."""
