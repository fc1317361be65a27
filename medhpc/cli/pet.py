"""PET subcommands: pet-geometry, pet-simulate, pet-recon, pet-scatter, pet-convert.
Parse, validate, call."""

from __future__ import annotations

import click

from medhpc.cli.help import command
from medhpc.cli.options import default_of, pass_run
from medhpc.cli.parsing import NumberList
from medhpc.pet.settings import ALGORITHMS, PENALISED, ReconSettings, ScatterSettings


def _default(name):
    return default_of(ReconSettings, name)


def _scatter_default(name):
    return default_of(ScatterSettings, name)


@command("pet-geometry", example="""\
medhpc pet-geometry --scanner ge-dmi-4ring-tof --out dmi.h5""")
@click.option("--scanner", required=True, help="Preset name (small-test, ge-dmi-4ring, "
              "ge-dmi-4ring-tof) or a TOML file with a [scanner] table.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write.")
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
def pet_geometry(scanner, out, overwrite):
    """Write the scanner and sinogram layout with the LOR end points (mm) of every bin, in
    the sinogram's own order (radial x view x plane x 3)."""
    from medhpc.parallel.comm import get_world
    from medhpc.pet.geometry_file import write_geometry_file
    from medhpc.pet.scanner import load_scanner

    world = get_world()
    geometry = world.agree(lambda: load_scanner(scanner))
    if world.is_root:
        write_geometry_file(out, geometry, overwrite=overwrite)
        click.echo(f"wrote {out}: {geometry.name}, sinogram {geometry.sinogram_shape}, "
                   f"{geometry.n_lors:,} LORs", err=True)


@command("pet-simulate", example="""\
medhpc pet-simulate --activity phantom/activity.nii.gz --mu-map phantom/mu_map.nii.gz \\
    --scanner small-test --counts 2e7 --out sinogram.h5""")
@click.option("--activity", required=True, type=click.Path(),
              help="Activity image (NIfTI or HDF5; 4-D = dynamic frames).")
@click.option("--scanner", required=True, help="Preset name or TOML file.")
@click.option("--mu-map", type=click.Path(), default=None,
              help="Linear attenuation (1/mm) on the activity's grid.")
@click.option("--counts", type=float, default=1e7, show_default=True,
              help="Expected prompt counts per frame.")
@click.option("--no-noise", is_flag=True, help="Write the expected counts, without Poisson noise.")
@click.option("--randoms-fraction", type=float, default=0.2, show_default=True,
              help="Share of the counts that are randoms (flat).")
@click.option("--tof", is_flag=True, help="Time-of-flight data (the scanner must have TOF bins).")
@click.option("--frames", type=int, default=None,
              help="With a 3-D activity: this many frames (independent noise realisations).")
@click.option("--scatter", is_flag=True,
              help="Add single-scatter coincidences (needs --mu-map); kept as 'true_scatter', "
                   "not in the additive term.")
@click.option("--rays", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rays per crystal face and side: the trues average rays x rays lines between "
                   "points spread over the two crystals (a detector response reconstructions "
                   "with one ray per LOR do not model).")
@click.option("--listmode", is_flag=True,
              help="Write the counts as list-mode events (crystal pairs, TOF bin, time) with the "
                   "factors, instead of a sinogram.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="With --listmode: acquisition time the events spread over.")
@click.option("--tof-calibration", type=click.Path(dir_okay=False), default=None,
              help="With --tof: a scanner whose crystals have these time offsets (and timing "
                   "resolutions): HDF5 'crystal_time_offset_ps' [rings, crystals per ring], "
                   "optional 'crystal_time_resolution_ps'.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Sinogram or list-mode file (HDF5).")
@pass_run("pet-simulate")
def pet_simulate(run, activity, scanner, mu_map, counts, no_noise, randoms_fraction, tof, frames,
                 scatter, rays, listmode, duration_s, tof_calibration, out):
    """Forward-project an activity image with attenuation, normalisation, randoms and Poisson
    noise; write a sinogram file (or, with --listmode, the events) holding the factors, the
    additive term, the image grid and the scanner."""
    from pathlib import Path

    import numpy as np

    from medhpc.io.atomic import check_output_path
    from medhpc.pet.projector import axis_aligned_grid
    from medhpc.pet.scanner import load_scanner
    from medhpc.pet.simulate import (Simulation, check_listmode_scanner, check_settings,
                                     read_inputs, write_simulated_listmode, write_simulation)
    from medhpc.errors import InputError
    from medhpc.pet.timing import read_timing_calibration

    def prepare():
        check_output_path(out, run.overwrite, (".h5", ".hdf5"))
        geometry = load_scanner(scanner)
        check_settings(geometry, counts, randoms_fraction, tof)
        if tof_calibration is not None and not tof:
            raise InputError(f"{tof_calibration}: --tof-calibration shifts TOF positions; "
                             f"expected --tof data (add --tof)")
        timing = (read_timing_calibration(tof_calibration, geometry)
                  if tof_calibration is not None else None)
        image, mu, grid = read_inputs(activity, mu_map)
        axis_aligned_grid(grid, activity)
        if frames is not None:
            if frames < 1 or image.shape[0] != 1:
                raise click.BadParameter("--frames needs a 3-D activity and a count >= 1")
            image = np.repeat(image, frames, axis=0)
        if listmode:
            check_listmode_scanner(geometry)
        if listmode and (no_noise or image.shape[0] != 1):
            raise click.BadParameter("--listmode needs Poisson counts of one acquisition: drop "
                                     "--no-noise and --frames (pet-recon --time-windows selects "
                                     "frames)")
        return geometry, image, mu, grid, timing

    geometry, image, mu, grid, timing = run.world.agree(prepare)
    simulation = Simulation(run, geometry, image, mu, grid, counts, not no_noise,
                            randoms_fraction, tof, source=activity, rays=rays, scatter=scatter,
                            timing=timing)
    if run.dry_run:
        run.print_plan({"scanner": geometry.name, "lors": geometry.n_lors,
                        "frames": int(image.shape[0]), "tof": tof})
        return
    data = simulation.execute(run.seed)
    if run.world.is_root:
        attrs = {"counts": counts, "randoms_fraction": randoms_fraction, "noise": not no_noise,
                 "seed": run.seed, "activity": str(Path(activity).resolve()), "rays": rays,
                 "scatter": scatter}
        with run.stage("write", "io"):
            if listmode:
                events = write_simulated_listmode(out, geometry, grid, data, duration_s, run.seed,
                                                  run.overwrite, attrs)
            else:
                write_simulation(out, geometry, grid, data, tof, run.overwrite, attrs=attrs)
        if listmode:
            run.log.info(f"wrote {out}: {geometry.name}, {events:,} events over {duration_s:g} s")
        else:
            run.log.info(f"wrote {out}: {geometry.name}, {data['frames']} frame(s), "
                         f"{float(np.sum(data['prompts'])):.4g} prompts")


@command("pet-recon", example="""\
mpiexec -n 4 medhpc pet-recon --sinogram sinogram.h5 --out recon.nii.gz \\
    --iterations 4 --subsets 8 --png --timings timings.json""")
@click.option("--sinogram", type=click.Path(), default=None,
              help="Sinogram file (pet-simulate's layout) or STIR projection data (.hs).")
@click.option("--listmode", type=click.Path(), default=None,
              help="List-mode events instead of a sinogram: a medhpc list-mode file (HDF5) or "
                   "CASToR list-mode data (.cdh header).")
@click.option("--scanner", default=None,
              help="With CASToR list-mode data: the scanner (preset or TOML) the crystal IDs "
                   "refer to.")
@click.option("--factors", type=click.Path(), default=None,
              help="With --listmode: a sinogram file whose multiplicative and additive terms "
                   "(for the whole acquisition) correct the events [default: the factors in "
                   "the list-mode file].")
@click.option("--mu-map", type=click.Path(), default=None,
              help="Attenuation from this linear-attenuation image (1/mm; NIfTI, HDF5 or "
                   "Interfile) instead of the sinogram's or list-mode factors'.")
@click.option("--norm", type=click.Path(), default=None,
              help="Normalisation sinogram (file.h5[:/dataset], radial x view x plane) instead "
                   "of the sinogram file's.")
@click.option("--randoms", type=click.Path(), default=None,
              help="Expected randoms sinogram (file.h5[:/dataset]) in place of the stored "
                   "additive term.")
@click.option("--scatter", type=click.Path(), default=None,
              help="Expected scatter sinogram (file.h5[:/dataset], e.g. from pet-scatter), added "
                   "to the additive term.")
@click.option("--scatter-iterations", type=click.IntRange(min=0), default=0, show_default=True,
              help="Reconstruct, estimate the scatter from that image and --mu-map "
                   "(pet-scatter), reconstruct with it: this many times, then the final "
                   "reconstruction; the last estimate is kept beside --out (.scatter.h5).")
@click.option("--time-windows", default=None,
              help="With --listmode: START:STOP[,START:STOP...] in seconds; one frame per "
                   "window [default: the whole acquisition].")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Image to write: .nii/.nii.gz or .h5 (4-D for dynamic data).")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=_default("algorithm"),
              show_default=True, help="osem: ordered subsets EM; mlem: all views per update; "
              "osem-rdp: OSEM with a relative difference prior (--beta), one-step-late; "
              "bsrem: relaxed block sequential regularised EM with the same prior, convergent; "
              "nmf: dynamic data as a low-rank product of --components spatial factors and "
              "time-activity curves, frames over the ranks; dip: the image as the output of "
              "a 3-D U-Net (from noise or --prior) fitted to the data by Adam, one step per "
              "subset (train extra; it needs far more --iterations than OSEM, e.g. 60 x 4 "
              "subsets).")
@click.option("--iterations", type=click.IntRange(min=1), default=_default("iterations"),
              show_default=True,
              help="Passes over all views (each of --subsets updates).")
@click.option("--subsets", type=click.IntRange(min=1), default=_default("subsets"),
              show_default=True,
              help="Ordered subsets of views (image updates per iteration; 1 for mlem).")
@click.option("--psf-fwhm-mm", type=click.FloatRange(min=0), default=_default("psf_fwhm_mm"),
              show_default=True,
              help="Image-space Gaussian resolution model.")
@click.option("--postfilter-fwhm-mm", type=click.FloatRange(min=0),
              default=_default("postfilter_fwhm_mm"), show_default=True,
              help="Gaussian filter of the final image (FWHM, mm; 0: none).")
@click.option("--beta", type=click.FloatRange(min=0), default=_default("rdp_beta"),
              show_default=True,
              help="Weight of the relative difference prior (osem-rdp, bsrem).")
@click.option("--gamma", type=click.FloatRange(min=0), default=_default("rdp_gamma"),
              show_default=True,
              help="Edge preservation of the relative difference prior (osem-rdp, bsrem).")
@click.option("--relaxation", type=click.FloatRange(min=0), default=_default("bsrem_relaxation"),
              show_default=True,
              help="bsrem: step 1 / (1 + relaxation x iteration).")
@click.option("--components", type=click.IntRange(min=1), default=_default("components"),
              show_default=True, help="nmf: spatial factors (kinetic components) of the model.")
@click.option("--prior", type=click.Path(exists=True, dir_okay=False), default=None,
              help="dip: an anatomical image (CT, MR) on the output grid as the network's "
                   "input [default: seeded noise].")
@click.option("--dip-lr", type=click.FloatRange(min=0, min_open=True), default=_default("dip_lr"),
              show_default=True, help="dip: Adam's learning rate.")
@click.option("--decomp", type=click.Choice(["planes", "views", "frames", "auto"]), default="auto",
              show_default=True, help="How the work is spread over the ranks.")
@click.option("--image-shape", type=NumberList(3, int), default=None,
              help="Image shape z,y,x [default: the grid stored in the sinogram].")
@click.option("--voxel-size-mm", type=NumberList(3), default=None,
              help="Voxel size x,y,z in mm [default: the stored grid].")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save a checkpoint every K iterations (always on SIGTERM/SIGUSR1).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside --out.")
@click.option("--sensitivity-cache", type=click.Path(dir_okay=False), default=None,
              help="Keep the subsets' sensitivity images in this HDF5 file and reuse them in "
                   "later runs with the same sinogram, subsets, grid and resolution model "
                   "(views decomposition).")
@click.option("--no-fov-mask", is_flag=True,
              help="Let the image be non-zero outside the scanner's radial field of view "
                   "[default: zero there].")
@click.option("--truth", type=click.Path(), default=None,
              help="The true activity on the output grid, to compare with (NRMSE; NEMA contrast "
                   "recovery and background variability for 'medhpc phantom pet'; with --png "
                   "shown beside the result) [default with --png: the activity the data were "
                   "simulated from, when it is still there].")
@click.option("--tof-calibration", type=click.Path(dir_okay=False), default=None,
              help="TOF data: each crystal's time offset (and timing resolution) from a timing "
                   "calibration, HDF5 'crystal_time_offset_ps' [rings, crystals per ring], "
                   "optional 'crystal_time_resolution_ps'; each LOR gets its own TOF kernel.")
@click.option("--png", is_flag=True, help="Also write a picture: central planes and convergence.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="JSON log [default: beside --out, .json].")
@pass_run("pet-recon")
def pet_recon(run, sinogram, listmode, scanner, factors, mu_map, norm, randoms, scatter,
              scatter_iterations, time_windows, out, algorithm, iterations,
              subsets, psf_fwhm_mm, postfilter_fwhm_mm, beta, gamma, relaxation, components,
              prior, dip_lr,
              decomp,
              image_shape, voxel_size_mm, checkpoint_every, resume, sensitivity_cache, no_fov_mask,
              tof_calibration, truth, png, log_path):
    """Reconstruct a PET image (OSEM, MLEM, or OSEM-OSL or BSREM with the relative difference
    prior) with the Joseph projector, spreading views, planes or frames over the ranks, or
    list-mode events."""
    from medhpc.pet.corrections import CorrectionFiles
    from medhpc.pet.run import PetRecon

    if (sinogram is None) == (listmode is None):
        raise click.UsageError("give one of --sinogram and --listmode")
    listmode_only = {"--scanner": scanner, "--factors": factors, "--time-windows": time_windows}
    given = [name for name, value in listmode_only.items() if value is not None]
    if sinogram is not None and given:
        raise click.UsageError(f"{given[0]} goes with --listmode, not --sinogram")
    sinogram_only = {"--norm": norm, "--randoms": randoms, "--scatter": scatter,
                     "--scatter-iterations": scatter_iterations or None}
    given = [name for name, value in sinogram_only.items() if value is not None]
    if listmode is not None and given:
        raise click.UsageError(f"{given[0]} goes with --sinogram; list-mode data take their "
                               f"factors from the file or --factors")
    if listmode is not None and (algorithm == "dip" or prior is not None):
        raise click.UsageError("--algorithm dip and --prior reconstruct sinograms (--sinogram)")
    if listmode is not None and (decomp != "auto" or sensitivity_cache):
        raise click.UsageError("--listmode spreads events over the ranks: leave out --decomp "
                               "and --sensitivity-cache")
    settings = ReconSettings(algorithm=algorithm, iterations=iterations, subsets=subsets,
                             psf_fwhm_mm=psf_fwhm_mm, postfilter_fwhm_mm=postfilter_fwhm_mm,
                             rdp_beta=beta if algorithm in PENALISED else 0.0, rdp_gamma=gamma,
                             bsrem_relaxation=relaxation, components=components, dip_lr=dip_lr)
    if listmode is not None:
        from medhpc.pet.run_listmode import ListModeRecon

        ListModeRecon(run, listmode, out, settings, scanner=scanner, factors=factors,
                      time_windows=time_windows, image_shape=image_shape,
                      voxel_size_mm=voxel_size_mm, resume=resume,
                      checkpoint_every=checkpoint_every, png=png, log_path=log_path,
                      fov_mask=not no_fov_mask, truth=truth, mu_map=mu_map,
                      tof_calibration=tof_calibration).execute()
        return

    def recon(scatter_file=scatter, target=out, **overrides):
        options = dict(decomp=decomp, image_shape=image_shape, voxel_size_mm=voxel_size_mm,
                       resume=resume, checkpoint_every=checkpoint_every, png=png,
                       log_path=log_path, sensitivity_cache=sensitivity_cache,
                       fov_mask=not no_fov_mask, truth=truth, tof_calibration=tof_calibration,
                       prior=prior,
                       corrections=CorrectionFiles(mu_map=mu_map, norm=norm, randoms=randoms,
                                                   scatter=scatter_file))
        options.update(overrides)
        return PetRecon(run, sinogram, target, settings, **options)

    if scatter_iterations:
        from medhpc.pet.run_scatter import ScatterLoop

        if mu_map is None or scatter is not None:
            raise click.UsageError("--scatter-iterations estimates the scatter from --mu-map: "
                                   "give --mu-map, and no --scatter file")
        ScatterLoop(run, recon, sinogram, mu_map, out, scatter_iterations).execute()
        return
    recon().execute()


@command("pet-scatter", example="""\
medhpc pet-recon --sinogram sino.h5 --out first.nii.gz --iterations 2
mpiexec -n 4 medhpc pet-scatter --sinogram sino.h5 --activity first.nii.gz \\
    --mu-map phantom/mu_map.nii.gz --out scatter.h5
medhpc pet-recon --sinogram sino.h5 --scatter scatter.h5 --out recon.nii.gz""")
@click.option("--sinogram", required=True, type=click.Path(), help="Sinogram file (prompts, "
              "additive randoms, normalisation).")
@click.option("--activity", required=True, type=click.Path(),
              help="Activity image: a reconstruction of these data (any image format).")
@click.option("--mu-map", required=True, type=click.Path(),
              help="Linear attenuation (1/mm) on any axis-aligned grid (any image format).")
@click.option("--window-kev", type=NumberList(2), default=_scatter_default("window_kev"),
              show_default=True, help="Energy window low,high in keV.")
@click.option("--energy-resolution", type=click.FloatRange(min=0, min_open=True),
              default=_scatter_default("energy_resolution"), show_default=True,
              help="Energy resolution (FWHM / energy) at 511 keV.")
@click.option("--scatter-point-mm", type=click.FloatRange(min=0, min_open=True),
              default=_scatter_default("scatter_point_mm"), show_default=True,
              help="Spacing of the scatter points.")
@click.option("--no-tail-fit", is_flag=True,
              help="Keep the model's own scale instead of fitting the tails of the prompts.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="HDF5 file with dataset 'scatter' (for pet-recon --scatter).")
@pass_run("pet-scatter")
def pet_scatter(run, sinogram, activity, mu_map, window_kev, energy_resolution, scatter_point_mm,
                no_tail_fit, out):
    """Estimate the scattered coincidences of a sinogram by single-scatter simulation from an
    activity and a mu-map, scaled to the prompts outside the body."""
    from medhpc.pet.run_scatter import ScatterEstimate

    settings = ScatterSettings(window_kev=tuple(window_kev), energy_resolution=energy_resolution,
                               scatter_point_mm=scatter_point_mm)
    ScatterEstimate(run, sinogram, activity, mu_map, out, settings,
                    fit_tails=not no_tail_fit).execute()


@command("pet-convert", example="""\
medhpc pet-convert --in scan.hs --norm norm.hs --acf acf.hs --randoms randoms.hs --out scan.h5
medhpc pet-convert --in histogram.cdh --scanner my-scanner.toml --out scan.h5
medhpc pet-convert --in sinogram.h5 --dataset prompts --out for-stir.hs
medhpc pet-convert --in sinogram.h5 --out for-castor.cdh
medhpc pet-convert --in span1.h5 --span 11 --out span11.h5""")
@click.option("--in", "source", required=True, type=click.Path(),
              help="STIR sinogram (.hs), CASToR histogram (.cdh) or medhpc sinogram (.h5).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="medhpc sinogram (.h5) from STIR or CASToR input; STIR header (.hs, data "
                   "beside it as .s) or CASToR histogram (.cdh, records beside it as .cdf) "
                   "from a medhpc sinogram.")
@click.option("--scanner", default=None,
              help="Preset or TOML file: required for CASToR data; for STIR data, the scanner "
                   "whose sinogram to fill (default: the one in the header).")
@click.option("--norm", type=click.Path(), default=None,
              help="With STIR input: STIR normalisation correction factors (.hs).")
@click.option("--acf", type=click.Path(), default=None,
              help="With STIR input: STIR attenuation correction factors (.hs).")
@click.option("--randoms", type=click.Path(), default=None,
              help="With STIR input: expected randoms counts (.hs).")
@click.option("--scatter", type=click.Path(), default=None,
              help="With STIR input: expected scatter counts (.hs).")
@click.option("--dataset", default="prompts", show_default=True,
              help="With medhpc input: prompts, additive, multiplicative, attenuation or "
                   "normalisation (factors are written as STIR correction factors, 1 / value).")
@click.option("--frame", type=click.IntRange(min=0), default=0, show_default=True,
              help="With medhpc input: the frame of dynamic data.")
@click.option("--span", type=int, default=None,
              help="With medhpc span-1 input and .h5 output: compress to this odd span (each "
                   "plane sums its ring pairs; factors are their mean), all frames and TOF bins.")
@pass_run("pet-convert")
def pet_convert(run, source, out, scanner, norm, acf, randoms, scatter, dataset, frame, span):
    """Convert projection data between STIR Interfile, CASToR histograms and medhpc
    sinogram files (span 1, non-TOF, non-arc-corrected)."""
    from medhpc.pet.run_convert import Conversion

    corrections = {"norm": norm, "acf": acf, "randoms": randoms, "scatter": scatter}
    Conversion(run, source, out, scanner, corrections, dataset, frame, span).execute()


COMMANDS = [pet_geometry, pet_simulate, pet_recon, pet_scatter, pet_convert]
