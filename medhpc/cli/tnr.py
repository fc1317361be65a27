"""TNR subcommands: tnr-register, tnr-apply and the phantom. Parse, validate, call."""

from __future__ import annotations

import click

from medhpc.cli.help import command
from medhpc.cli.options import default_of, pass_run
from medhpc.tnr.settings import (INTERPOLATION_ORDER, MODES, NORMALISATIONS, OUTPUT_COMPRESSIONS,
                                 PLACEMENTS, STAINS, MatchSettings, OutputSettings, TnrSettings)


def _default(name):
    return default_of(TnrSettings, name)


def _match_default(name):
    return default_of(MatchSettings, name)


tile_option = click.option(
    "--tile", type=int, default=default_of(OutputSettings, "tile"), show_default=True,
    help="Output tile side (px): the warp step, the zarr chunks and TIFF tiles; bounds the "
         "memory per rank (see --dry-run).")
compression_option = click.option(
    "--compression", type=click.Choice(OUTPUT_COMPRESSIONS),
    default=default_of(OutputSettings, "compression"), show_default=True,
    help="Pyramidal outputs: auto is JPEG for 8-bit RGB JPEG slides, else zlib.")


@command("tnr-register", example="""\
mpiexec -n 4 medhpc tnr-register --input slides/ --out volume.ome.tif --level 3 \\
    --png qc.png --fields registration.h5
ls slides/*.svs | medhpc tnr-register --input - --out volume.h5""")
@click.option("--input", "source", required=True, multiple=True,
              help="Folder of section images (PNG/TIFF/JPEG) or whole slides (pyramidal "
                   "TIFF/OME-TIFF/SVS/NDPI, OME-Zarr), natural order; a .txt list of slides "
                   "(one path per line; - reads the list from stdin) or --input given once "
                   "per slide; a multi-page or "
                   "OME-TIFF; or an HDF5 stack (file.h5[:dataset]).")
@click.option("--out", required=True, type=click.Path(),
              help="Registered stack: .ome.zarr or .ome.tif (pyramidal, written tile by tile "
                   "by every rank), .h5 (parts written by every rank), .tif or .nii/.nii.gz "
                   "(gathered on rank 0).")
@click.option("--mode", type=click.Choice(MODES), default=_default("mode"),
              show_default=True, help="tnr: smooth trajectories along z; pairwise: straight "
                                      "trajectories; none: rigid pre-alignment only.")
@click.option("--sigma", type=float, default=_default("sigma"), show_default=True,
              help="Gaussian smoothing of the trajectories along z, in sections.")
@click.option("--patch", type=int, default=_match_default("patch"), show_default=True,
              help="Patch side (working px).")
@click.option("--search", type=int, default=_match_default("search"), show_default=True,
              help="Search radius R: patches move by at most +/-R working px.")
@click.option("--grid", type=int, default=_match_default("grid"), show_default=True,
              help="Spacing of the patch grid (working px).")
@click.option("--downsample", type=int, default=None,
              help="Working level: this many input pixels per working pixel "
                   f"[default {_default('downsample')}].")
@click.option("--level", type=int, default=None,
              help="Working level as a pyramid level: --downsample 2**LEVEL.")
@click.option("--stain", type=click.Choice(STAINS), default=_default("stain"),
              show_default=True, help="Channel that sections of any stain share.")
@click.option("--min-ncc", type=float, default=_match_default("min_ncc"), show_default=True,
              help="Matches with a lower NCC peak are rejected.")
@click.option("--max-angle", type=float, default=_default("max_angle_deg"), show_default=True,
              help="Largest rotation between neighbours searched by the rigid pre-alignment "
                   "(deg; 180 searches the whole circle).")
@click.option("--mirror/--no-mirror", default=_default("mirror"), show_default=True,
              help="Also detect sections laid face down (mirrored) in the rigid pre-alignment.")
@click.option("--normalise", type=click.Choice(NORMALISATIONS), default=_default("normalise"),
              show_default=True,
              help="Output intensities: map each section's tissue quantiles onto the stack's "
                   "(histogram) or keep them (none).")
@click.option("--placement", type=click.Choice(PLACEMENTS), default=_default("placement"),
              show_default=True,
              help="Model of each section's random placement removed before smoothing: rigid "
                   "(rotation and shift on the slide) or affine (also the cutting compression; "
                   "removes a real growth of the anatomy along z with it).")
@click.option("--interpolation", type=click.Choice(list(INTERPOLATION_ORDER)),
              default=_default("interpolation"),
              show_default=True, help="Resampling of the sections into the volume.")
@click.option("--full-res", is_flag=True,
              help="Apply the warp to the input resolution, tile by tile (default: output at "
                   "the working level).")
@tile_option
@compression_option
@click.option("--fields", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-section displacement fields (output -> input, working "
                   "px), the rigid transforms and the trajectories (HDF5).")
@click.option("--resume", is_flag=True,
              help="Reuse the pairs already matched by an interrupted run with the same input "
                   "and settings.")
@click.option("--png", is_flag=True,
              help="Also write a QC picture: orthogonal views before/after and trajectories.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="JSON log [default: beside --out, .json].")
@pass_run("tnr-register")
def tnr_register(run, source, out, mode, sigma, patch, search, grid, downsample, level, stain,
                 min_ncc, max_angle, mirror, normalise, placement, interpolation, full_res, tile,
                 compression, fields, resume,
                 png, log_path):
    """Rebuild a volume from serial sections by trajectory-based non-linear registration:
    matches between neighbours are chained into trajectories through the stack, smoothed
    along z, and each section is warped onto its smoothed trajectories."""
    from medhpc.errors import InputError
    from medhpc.io.lists import is_stdin
    from medhpc.tnr.run import StackRegistration
    from medhpc.tnr.sources import input_files

    def check_options():
        if downsample is not None and level is not None:
            raise InputError("--downsample and --level both given; expected one of them")
        if any(is_stdin(s) for s in source):  # only rank 0 has stdin under mpiexec
            return tuple(str(path) for path in input_files(source))
        return source

    source = run.world.agree(check_options)
    factor = 2 ** level if level is not None else (downsample or 1)
    settings = TnrSettings(mode=mode, sigma=sigma, stain=stain, downsample=factor,
                           match=MatchSettings(patch=patch, search=search, grid=grid,
                                               min_ncc=min_ncc),
                           max_angle_deg=max_angle, mirror=mirror, normalise=normalise,
                           placement=placement, interpolation=interpolation,
                           full_res=full_res)
    StackRegistration(run, source[0] if len(source) == 1 else list(source), out, settings,
                      fields=fields, log_path=log_path, png=png, resume=resume,
                      output=OutputSettings(tile=tile, compression=compression)).execute()


@command("tnr-apply", example="""\
mpiexec -n 4 medhpc tnr-apply --registration registration.h5 --input ihc_slides/ \\
    --out ihc_volume.ome.tif --geojson tumour.geojson --geojson-out tumour_3d.geojson""")
@click.option("--registration", required=True, type=click.Path(dir_okay=False),
              help="The --fields file of a tnr-register run (HDF5 with warps/ and sections/).")
@click.option("--input", "source", default=None,
              help="The other stain's sections, as tnr-register's --input; matched to the "
                   "registered sections by name (stacks: same count and order), at any one "
                   "scale of the registered size.")
@click.option("--out", default=None, type=click.Path(),
              help="Warped stack of --input: pyramidal .ome.tif or .ome.zarr (tile by tile, "
                   "every rank its sections; whole slides are read by region), .h5 (parts "
                   "written by every rank), .tif or .nii/.nii.gz (gathered on rank 0).")
@click.option("--full-res", is_flag=True,
              help="Output at the resolution of --input [default: the grid of tnr-register's "
                   "volume].")
@click.option("--downsample", type=float, default=None,
              help="Output at the resolution of --input divided by this factor.")
@click.option("--interpolation", type=click.Choice(list(INTERPOLATION_ORDER)), default=None,
              help="Resampling of the sections [default: the registration's].")
@tile_option
@compression_option
@click.option("--points", type=click.Path(dir_okay=False), default=None,
              help="CSV of points with columns section (name or index), x, y in input-section "
                   "pixels (of --input, else of the registered sections).")
@click.option("--points-out", type=click.Path(dir_okay=False), default=None,
              help="CSV of the mapped points: section, x, y, z (output-volume pixels), inside.")
@click.option("--geojson", type=click.Path(), default=None,
              help="GeoJSON features with properties.section, or a folder of one GeoJSON file "
                   "per section (named after it).")
@click.option("--geojson-out", type=click.Path(), default=None,
              help="Mapped GeoJSON (a folder when --geojson is one).")
@click.option("--origin", type=click.Choice(["pixel-centre", "pixel-corner"]),
              default="pixel-centre", show_default=True,
              help="Annotation coordinates put pixel (0, 0)'s centre at (0, 0) (pixel-centre) "
                   "or at (0.5, 0.5) (pixel-corner, as QuPath).")
@click.option("--normalise", type=click.Choice(["histogram", "none"]), default=None,
              help="Output intensities: each section's tissue quantiles onto the stack's "
                   "(histogram) or kept (none) [default: as the registration].")
@pass_run("tnr-apply")
def tnr_apply(run, registration, source, out, full_res, downsample, interpolation, tile,
              compression, points, points_out, geojson, geojson_out, origin, normalise):
    """Apply a saved tnr-register registration to another stain of the same sections and to
    point or GeoJSON annotations (mapped input -> output)."""
    from medhpc.tnr.apply import Annotations, ApplySettings, Application

    settings = ApplySettings(full_res=full_res, downsample=downsample,
                             interpolation=interpolation, origin=origin,
                             normalise=normalise)
    Application(run, registration, source, out, settings,
                Annotations(points, points_out, geojson, geojson_out),
                OutputSettings(tile=tile, compression=compression)).execute()


@command("tnr", example="""\
medhpc phantom tnr --out tnr-phantom --sections 24""")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for sections/section_NNN.png, truth.h5 and phantom.json.")
@click.option("--sections", type=int, default=24, show_default=True,
              help="Number of serial sections to cut.")
@click.option("--size", type=int, default=256, show_default=True, help="Section side (px).")
@click.option("--rotation-deg", type=float, default=2.0, show_default=True,
              help="Largest random rotation of a section.")
@click.option("--shift-px", type=float, default=None, help="Largest random shift [size/50].")
@click.option("--warp-px", type=float, default=None,
              help="Amplitude of the smooth random distortion [size/85].")
@click.option("--curvature-px", type=float, default=None,
              help="Drift of the anatomy along z [size/20].")
@click.option("--heldout", type=int, default=64, show_default=True,
              help="Evaluation points per section (never used for matching).")
@click.option("--blank", type=int, multiple=True, help="Make this section empty glass.")
@click.option("--restain", type=int, multiple=True,
              help="Give this section another stain (other colours, gamma).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the phantom's random shapes and fields.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
def phantom_tnr(out, sections, size, rotation_deg, shift_px, warp_px, curvature_px, heldout,
                blank, restain, seed, overwrite):
    """Serial sections cut from a textured 3-D block with smoothly curved structures, each
    with its own random rigid and smooth non-linear distortion, and the ground truth."""
    from medhpc.parallel.comm import get_world
    from medhpc.phantoms.tnr import TnrPhantomSettings, check_settings, write_tnr_phantom

    settings = TnrPhantomSettings(sections=sections, size=size, rotation_deg=rotation_deg,
                                  shift_px=shift_px, warp_px=warp_px, curvature_px=curvature_px,
                                  heldout=heldout, blank=tuple(blank), restain=tuple(restain),
                                  seed=seed)
    world = get_world()

    def write():
        check_settings(settings.resolved())
        return write_tnr_phantom(out, settings, overwrite=overwrite)

    summary = world.agree(write)
    if world.is_root:
        click.echo(f"wrote {out}: {summary['sections']} sections of {summary['size']}x"
                   f"{summary['size']} px (sections/), ground truth truth.h5", err=True)


COMMANDS = [tnr_register, tnr_apply]
PHANTOM_COMMANDS = [phantom_tnr]
