"""Links that carry update packages to devices (torch-free): HTTP, a serial line, and the push
driver that resumes over either. The device side of each link lives in :mod:`edgepeft.update`."""
