"""twistd plugins for kvconfig; importing this file imports no server code."""

from twisted.application.service import ServiceMaker

kvconfig = ServiceMaker(
    "kvconfig",
    "kvconfig.tap",
    "A durable, revisioned configuration server (XML-RPC and a line protocol).",
    "kvconfig",
)
