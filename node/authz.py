"""Who may call what on a node: mutual TLS proves the caller is in the cluster, this checks its role.

Only the coordinator loads, pushes or releases shards and reads Results; the coordinator and other nodes may open
Forward streams; any member (the admin too) may ask for Health and Describe. The role is the organizational unit of
the caller's certificate, which only the cluster CA signs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from node.identity import Role, peer_role

log = logging.getLogger(__name__)

_ANY = frozenset(Role)
_ALLOWED: dict[str, frozenset[Role]] = {
    "/llama_node.v1.Node/LoadShard": frozenset({Role.coordinator}),
    "/llama_node.v1.Node/PushSlice": frozenset({Role.coordinator}),
    "/llama_node.v1.Node/ReleaseShard": frozenset({Role.coordinator}),
    "/llama_node.v1.Node/Forward": frozenset({Role.coordinator, Role.node}),
    "/llama_node.v1.Node/Results": frozenset({Role.coordinator}),
}


def caller(context: aio.ServicerContext) -> tuple[str, Role | None]:
    """(common name, role) of the authenticated caller; ("", None) without a certificate."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return "", None
    return peer_role(pems[0])


class RoleInterceptor(aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) a call whose caller's role may not make it."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        allowed = _ALLOWED.get(details.method, _ANY)
        method = details.method

        async def check(context: aio.ServicerContext) -> None:
            name, role = caller(context)
            if role not in allowed:
                log.warning("refused %s from %r (role %s)", method, name, role)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{role} {name!r} may not call {method}")

        if handler.response_streaming:
            inner_stream = handler.stream_stream or handler.unary_stream

            async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await check(context)
                async for item in inner_stream(request, context):
                    yield item

            behaviour: Any = streaming
        else:
            inner_unary = handler.stream_unary or handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                await check(context)
                return await inner_unary(request, context)

            behaviour = unary
        return with_behaviour(handler, behaviour)


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Any) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind and (de)serialisers as ``handler``, running ``behaviour`` instead."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
