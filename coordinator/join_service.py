"""The coordinator's gRPC endpoint: ``Coordinator.Join`` (sign a node's certificate when it proves the token),
``Echo`` (the nodes' link probe) and ``ListNodes`` (``llama-node status``).

It presents the cluster CA's own certificate, so a joining node can pin it by the token's hash before sending
anything. It asks for no client certificate (a joining node has none): Join proves the token with an HMAC over
the node's CSR, Echo and ListNodes with an HMAC over their purpose. With ``ca=None`` (the
``--insecure`` mode) it is plain text and signs nothing.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import grpc
from grpc import aio

from coordinator.pki import ClusterCA, JoinRefusedError
from protos.llama_node.v1 import cluster_pb2 as cpb
from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)

#: Echo payloads up to this size (the link probe sends 4 MiB).
MAX_ECHO_BYTES = 16 << 20


class CoordinatorServicer(cpb_grpc.CoordinatorServicer):
    def __init__(self, ca: ClusterCA | None, coordinator_id: str,
                 snapshot: Callable[[], cpb.ListNodesReply]) -> None:  # fmt: skip
        self.ca, self.coordinator_id, self.snapshot = ca, coordinator_id, snapshot

    async def _require_token(self, purpose: str, proof: bytes, context: aio.ServicerContext) -> None:
        if self.ca is None:
            return
        if not hmac.compare_digest(self.ca.token.purpose_proof(purpose), proof):
            log.warning("refused %s from %s: no proof of the join token", purpose, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{purpose} needs proof of this cluster's token")

    async def Join(self, request: cpb.JoinRequest, context: aio.ServicerContext) -> cpb.JoinReply:  # noqa: N802
        peer = context.peer()
        if self.ca is None:
            log.info("join handshake: node %s from %s accepted WITHOUT authentication (--insecure)", request.node_id,
                     peer)  # fmt: skip
            return cpb.JoinReply(coordinator_id=self.coordinator_id)
        try:
            cert = self.ca.sign_join(request.node_id, request.csr_der, request.proof, list(request.addresses))
        except JoinRefusedError as e:
            log.warning("join handshake: refused node %r from %s: %s", request.node_id, peer, e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        log.info("join handshake: node %s from %s proved the token; signed its certificate for %s (%s, %.2f GB free)",
                 request.node_id, peer, ", ".join(request.addresses), request.device.kind,
                 request.device.memory_free / 1e9)  # fmt: skip
        return cpb.JoinReply(certificate_pem=cert, ca_pem=self.ca.cert_pem, coordinator_id=self.coordinator_id)

    async def Echo(self, request: cpb.EchoRequest, context: aio.ServicerContext) -> cpb.EchoReply:  # noqa: N802
        await self._require_token("echo", request.proof, context)
        return cpb.EchoReply(received_bytes=len(request.payload))

    async def ListNodes(self, request: cpb.ListNodesRequest, context: aio.ServicerContext) -> cpb.ListNodesReply:  # noqa: N802
        await self._require_token("status", request.proof, context)
        return self.snapshot()


async def start_coordinator_server(
    ca: ClusterCA | None,
    coordinator_id: str,
    snapshot: Callable[[], cpb.ListNodesReply],
    host: str,
    port: int,
) -> tuple[aio.Server, int]:
    """Start the endpoint; (server, bound port)."""
    # no SO_REUSEPORT: a second coordinator on a taken port must fail, not share its joins with the first
    server = aio.server(options=[("grpc.max_receive_message_length", MAX_ECHO_BYTES), ("grpc.so_reuseport", 0)])
    cpb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(ca, coordinator_id, snapshot), server)
    target = f"{host}:{port}"
    if ca is None:
        bound = server.add_insecure_port(target)
    else:
        ident = ca.server_identity()
        creds = grpc.ssl_server_credentials([(ident.key_pem, ident.cert_pem)], root_certificates=ca.cert_pem,
                                            require_client_auth=False)  # fmt: skip
        bound = server.add_secure_port(target, creds)
    if bound == 0:
        raise OSError(f"cannot listen on {target}")
    await server.start()
    log.info("coordinator %s: join endpoint on %s:%d (%s)", coordinator_id, host, bound,
             "TLS, CA-pinned" if ca else "PLAIN TEXT, --insecure")  # fmt: skip
    return server, bound
