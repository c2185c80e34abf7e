"""Vaults, deleted vaults and access policies."""
from aiohttp import web

from ..domain.vaults import DEFAULT_RETENTION
from . import models, render
from .body import json_body, model_body, validated


def _svc(request):
    return request.app["domain"], request.app["domain"].service, request["caller"]


async def create(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    raw = await json_body(request)
    if isinstance(raw.get("name"), str):
        request["vault"] = raw["name"]  # for the audit chain, also when the body is refused
    body = validated(models.VaultCreate, raw)
    retention = DEFAULT_RETENTION if body.softDeleteRetentionInDays is None \
        else body.softDeleteRetentionInDays
    v = await domain.run(svc.create_vault, caller, body.name, body.location, body.subscription,
                         retention, bool(body.enablePurgeProtection))
    v, pols = await domain.run(svc.get_vault, caller, v.name)
    return web.json_response(render.vault(svc, v, pols), status=201)


async def show(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v, pols = await domain.run(svc.get_vault, caller, request.match_info["vault"])
    return web.json_response(render.vault(svc, v, pols))


async def list_(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    deleted = request.match_info.route.name == "DeletedVaultList"
    vs = await domain.run(svc.list_vaults, caller, deleted)
    return web.json_response({"value": [render.vault(svc, v) for v in vs], "nextLink": None})


async def update(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    body = await model_body(request, models.VaultUpdate)
    v = await domain.run(svc.update_vault, caller, request.match_info["vault"],
                         body.enablePurgeProtection, body.softDeleteRetentionInDays)
    return web.json_response(render.vault(svc, v))


async def delete(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v = await domain.run(svc.delete_vault, caller, request.match_info["vault"])
    return web.json_response(render.vault(svc, v))


async def show_deleted(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v = await domain.run(svc.get_deleted_vault, caller, request.match_info["vault"])
    return web.json_response(render.vault(svc, v))


async def recover(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v = await domain.run(svc.recover_vault, caller, request.match_info["vault"])
    return web.json_response(render.vault(svc, v))


async def purge(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v = await domain.run(svc.purge_vault, caller, request.match_info["vault"])
    request["vault_id"] = v.id  # the service chain's entry says which closed chain was this vault's
    return web.Response(status=204)


async def set_policy(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    perms = (await model_body(request, models.PolicySet)).permissions.keys
    oid, perms = await domain.run(svc.set_policy, caller, request.match_info["vault"],
                                  request.match_info["object_id"], perms)
    v, _ = await domain.run(svc.get_vault, caller, request.match_info["vault"])
    return web.json_response(render.policy(v, oid, perms))


async def list_policies(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    v, pols = await domain.run(svc.get_vault, caller, request.match_info["vault"])
    return web.json_response({"value": [render.policy(v, o, p) for o, p in pols.items()]})


async def delete_policy(request: web.Request) -> web.Response:
    domain, svc, caller = _svc(request)
    await domain.run(svc.delete_policy, caller, request.match_info["vault"],
                     request.match_info["object_id"])
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/vaults", create, name="VaultCreate")
    router.add_get("/vaults", list_, name="VaultList")
    router.add_get("/vaults/{vault}", show, name="VaultGet")
    router.add_patch("/vaults/{vault}", update, name="VaultUpdate")
    router.add_delete("/vaults/{vault}", delete, name="VaultDelete")
    router.add_get("/deletedvaults", list_, name="DeletedVaultList")
    router.add_get("/deletedvaults/{vault}", show_deleted, name="DeletedVaultGet")
    router.add_post("/deletedvaults/{vault}/recover", recover, name="VaultRecover")
    router.add_delete("/deletedvaults/{vault}", purge, name="VaultPurge")
    router.add_get("/vaults/{vault}/accessPolicies", list_policies, name="PolicyList")
    router.add_put("/vaults/{vault}/accessPolicies/{object_id}", set_policy, name="PolicySet")
    router.add_delete("/vaults/{vault}/accessPolicies/{object_id}", delete_policy, name="PolicyDelete")
