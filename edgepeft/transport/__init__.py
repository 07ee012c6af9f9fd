"""Every link that carries updates and jobs, both ends, in one place (device side: torch-free).

- Push from a host: :mod:`.link` (the resumable push driver), :mod:`.http`, :mod:`.serial_link`
  (:mod:`.framing`, :mod:`.serial_proto`), :mod:`.open` (a link from a URL), :mod:`.linesim` (a simulated line).
- The device's end of each link: :mod:`.http_agent` (routes on the device's HTTP API), :mod:`.serial_agent`,
  :mod:`.tuf_pull` (pull from a TUF repository), :mod:`.mqtt_agent` (jobs over MQTT).
- The controller's MQTT end: :mod:`.mqtt_plane`; both ends' client: :mod:`.mqtt`.

A device-side endpoint is handed the device (:class:`edgepeft.update.device.Device`) as an object;
this package never imports :mod:`edgepeft.update`, which composes the links in its agent.
"""
