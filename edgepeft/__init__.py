"""edgepeft: fine-tune adapters on a server, ship one base and many swappable adapters to devices.

Importing the package is cheap: the server side (``edgepeft.train``,
``edgepeft.export``, ``edgepeft.bundle``) loads torch only inside the
functions that need it, and the device side (``edgepeft.runtime``,
``edgepeft.contracts``) never does.
"""

__version__ = "0.2.0"
