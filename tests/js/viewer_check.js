// Runs a covidct viewer page in jsdom and prints, as JSON, what the page shows after each user action.
// Usage: NODE_PATH=.venv/js/node_modules node tests/js/viewer_check.js viewer.html
const {JSDOM} = require('jsdom');
const fs = require('fs');
const dom = new JSDOM(fs.readFileSync(process.argv[2], 'utf8'), {
  runScripts: 'dangerously', pretendToBeVisual: true,
  beforeParse(w) { w.HTMLCanvasElement.prototype.getContext = () => ({clearRect() {}, fillRect() {}, fillStyle: ''}); },
});
const w = dom.window, d = w.document;
const D = JSON.parse(d.getElementById('data').textContent);
const ct = d.getElementById('ct'), ov = d.getElementById('ov'), win = d.getElementById('win');
const slider = d.getElementById('slider'), show = d.getElementById('show'), where = d.getElementById('where');
const errors = [];
w.addEventListener('error', e => errors.push(String(e.message)));
// which slice and window the CT picture is, read back from the embedded frames
function state() {
  const src = ct.src.replace('data:image/jpeg;base64,', '');
  let found = null;
  D.frames.forEach((f, k) => {
    if (f.ct === src) found = {slice: k, window: D.windows[0]};
    Object.entries(f.win).forEach(([name, b64]) => { if (b64 === src) found = {slice: k, window: name}; });
  });
  return {...found, slider: +slider.value, overlay: ov.style.display, where: where.textContent};
}
const key = k => d.dispatchEvent(new w.KeyboardEvent('keydown', {key: k}));
const steps = {options: [...win.options].map(o => o.value), disabled: win.disabled, start: state()};
key('ArrowDown'); steps.down = state();
key('w'); steps.w = state();
key('ArrowUp'); steps.up = state();
key('w'); steps.w_again = state();
win.selectedIndex = win.options.length - 1; win.dispatchEvent(new w.Event('change')); steps.select_last = state();
slider.value = 0; slider.dispatchEvent(new w.Event('input')); steps.slider0 = state();
show.checked = false; show.dispatchEvent(new w.Event('change')); steps.hidden = state();
steps.errors = errors;
console.log(JSON.stringify(steps));
