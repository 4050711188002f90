"""Shared route dependencies: the app's clients and connections."""

from fastapi import Request
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.clients import ServiceClient


def db(request: Request) -> async_sessionmaker:
    return request.app.state.sessionmaker


def js(request: Request) -> JetStreamContext:
    return request.app.state.js


def auth(request: Request) -> ServiceClient:
    return request.app.state.auth


def storage(request: Request) -> ServiceClient:
    return request.app.state.storage


def registry(request: Request) -> ServiceClient:
    return request.app.state.registry
