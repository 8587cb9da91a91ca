"""`ivy fleet`: the operator's side of a fleet of stations, over the MQTT
broker the stations share: every station's state at once (their retained
reports), and a change rolled out in waves that stop on failure."""
