"""JupyterLab in this repository (`make lab` puts this folder on JUPYTER_CONFIG_PATH): a notebook under nbs/ is saved
exactly as it is committed — no outputs, no execution counts, only the metadata nbdev-clean keeps (the `tags` papermill
needs, the kernelspec, the kernel's language_info) — so opening, running and saving a notebook leaves `git status` clean."""


def rblab_clean_on_save(model, path, contents_manager, **kwargs):
    "Pre-save hook: store notebooks under nbs/ in their committed, clean form."
    if model.get('type') != 'notebook' or not str(path).replace('\\', '/').lstrip('/').startswith('nbs/'): return
    import json, os
    from nbdev.clean import clean_nb
    nb = model['content']
    # the lab rewrites kernelspec/language_info with the running kernel's (its display name, its Python patch
    # version): keep the committed ones, so a researcher on another Python does not dirty every notebook they open
    on_disk = contents_manager._get_os_path(path)
    if os.path.exists(on_disk):
        with open(on_disk, encoding='utf-8') as f: committed = json.load(f).get('metadata', {})
        for key in ('kernelspec', 'language_info'):
            if key in committed: nb['metadata'][key] = committed[key]
    clean_nb(nb, allowed_metadata_keys=['language_info'], allowed_cell_metadata_keys=['tags'])
    nb['metadata'].pop('widgets', None)  # ipywidgets' saved state: output, not source
    for cell in nb['cells']:
        if cell['cell_type'] == 'code': cell['outputs'] = []


c.FileContentsManager.pre_save_hook = rblab_clean_on_save  # noqa: F821 (`c` is Jupyter's config object)
